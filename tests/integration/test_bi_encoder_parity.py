"""Parity of the ONNX bi-encoder bundle with sentence-transformers on the same checkpoint.

The reference runs in a subprocess (tests/reference/st_embed.py); this process never imports torch.
Needs the bundle made by `python -m sieve_core.models.prepare --models-dir models` (`make test` runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.models.bundle import BundleError, load_bundle_manifest

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(os.environ.get("SIEVE_MODELS_DIR", REPO / "models"))
BUNDLE = MODELS_DIR / "all-MiniLM-L6-v2"
REFERENCE_SCRIPT = REPO / "tests" / "reference" / "st_embed.py"
MIN_COSINE = 0.9999
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length, [CLS] and [SEP] included

pytestmark = pytest.mark.skipif(
    not (BUNDLE / "manifest.json").is_file(),
    reason=f"no bundle at {BUNDLE}; run `python -m sieve_core.models.prepare --models-dir {MODELS_DIR}`",
)

LONG_ABSTRACT = (
    "Background: Late interaction models encode queries and documents separately into token vectors. "
    "Methods: We measured retrieval quality on biomedical claims with several encoders and cascades. "
    "Results: Re-ranking the top hundred candidates improved nDCG@10 by 4.2 points (95% CI 3.1-5.3). "
) * 12
TEXTS: list[str] = [
    # short
    "hello",
    "a",
    "",
    " ",
    "COVID-19",
    "What is the capital of France?",
    "BRCA1 mutation breast cancer risk",
    # mixed case and punctuation
    "ThE qUiCk BrOwN fOx JuMpS oVeR tHe LaZy DoG.",
    "HTTP/2 vs. gRPC-web: who's faster?!",
    "e-mail: someone@example.org; URL: https://example.org/a?b=c&d=e",
    # numbers
    "3.14159 2.71828 1.41421",
    "In 2023, 1,234,567 people (12.5%) received 2 doses of 50 mg.",
    "0000000000 1111111111 9876543210",
    "IL-6, TNF-α and CRP > 10 mg/L at t = 48 h",
    # whitespace-heavy
    "   leading and trailing spaces   ",
    "tabs\tbetween\twords",
    "line one\nline two\n\nline four",
    "many     spaces      between     words",
    "\n\n\t  \n",
    # non-ASCII
    "Grüße aus München: Straße, Mädchen, Übermut.",
    "Ça, c'est déjà l'été à Noël — où est le café ?",
    "机器学习是人工智能的一个分支。",
    "北京大学的研究人员发现了新的蛋白质结构",
    "التعلم الآلي هو فرع من فروع الذكاء الاصطناعي",
    "Η εξίσωση ∑ᵢ αᵢ xᵢ ≤ ∫₀^∞ e^{-x} dx = 1",
    "∀ε>0 ∃δ>0: |x−a|<δ ⇒ |f(x)−f(a)|<ε",
    "I love this 😍🔥🚀 so much 👍🏽",
    "Привет, как дела? Всё хорошо.",
    "日本語のテキストも少し含めます。",
    "naïve coöperation façade résumé",
    # long: well over 256 tokens, so truncation decides the result
    LONG_ABSTRACT,
    "word " * 600,
    "Ünïcödé " * 200 + "tail that must be truncated away",
    "The mitochondrion is the powerhouse of the cell. " * 40,
    # medium
    "Vitamin D supplementation does not reduce the risk of fractures in community-dwelling older adults.",
    "Transformers use self-attention to weigh the relevance of every token to every other token.",
    "Sieve finds candidates fast with a bi-encoder vector index, then re-ranks the few best.",
    "A queue of asynchronous workers computes ColBERT and cross-encoder scores for the candidates.",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def runner() -> BiEncoderRunner:
    runner = BiEncoderRunner(BUNDLE, intra_op_threads=2)
    runner.warmup()
    return runner


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, list[np.ndarray]]:
    """sentence-transformers' sentence embeddings and per-text token embeddings (with [CLS]/[SEP])."""
    work = tmp_path_factory.mktemp("st_reference")
    (work / "texts.json").write_text(json.dumps(TEXTS, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(REFERENCE_SCRIPT),
        str(work / "texts.json"),
        str(work / "emb.npy"),
        "--tokens",
        str(work / "tokens.npz"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"reference script failed:\n{done.stderr[-4000:]}"
    with np.load(work / "tokens.npz") as tokens:
        per_text = [tokens[f"arr_{i}"] for i in range(len(TEXTS))]
    return np.load(work / "emb.npy"), per_text


def test_texts_cover_truncation() -> None:
    """The parity texts include some longer than the model's max length (so truncation is compared) and
    some far shorter (so padding inside a batch is compared)."""
    tokenizer = Tokenizer.from_file(str(BUNDLE / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(TEXTS)]
    assert max(lengths) > MAX_LENGTH, lengths
    assert min(lengths) < MAX_LENGTH // 4, lengths


def test_embed_matches_sentence_transformers(
    runner: BiEncoderRunner, reference: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    expected, _ = reference
    got = runner.embed(TEXTS, batch_size=8)
    assert got.shape == expected.shape == (len(TEXTS), runner.dims)
    assert got.dtype == np.float32
    cos = _cosines(got, expected)
    worst = int(np.argmin(cos))
    assert cos.min() >= MIN_COSINE, f"cosine {cos.min():.6f} for text #{worst}: {TEXTS[worst][:80]!r}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_truncation_matches_sentence_transformers(
    runner: BiEncoderRunner, reference: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    _, expected_tokens = reference
    ours = runner.token_vectors(TEXTS)
    # sentence-transformers keeps [CLS] and [SEP]; token_vectors drops them.
    assert [len(t) + 2 for t in ours] == [len(t) for t in expected_tokens]
    assert max(len(t) for t in expected_tokens) == MAX_LENGTH


def test_token_vectors_match_reference(
    runner: BiEncoderRunner, reference: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    _, expected_tokens = reference
    ours = runner.token_vectors(TEXTS, batch_size=8)
    for index, (got, full) in enumerate(zip(ours, expected_tokens, strict=True)):
        assert got.dtype == np.float32 and got.shape == (len(full) - 2, runner.dims)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        if len(got):
            cos = _cosines(got, full[1:-1])
            assert cos.min() >= MIN_COSINE, f"token cosine {cos.min():.6f} in text #{index}"


def test_token_vectors_are_batch_invariant(runner: BiEncoderRunner) -> None:
    # Padding a short text next to a long one must not change its token vectors.
    batched = runner.token_vectors(TEXTS, batch_size=len(TEXTS))
    for text, together in zip(TEXTS[:12], batched[:12], strict=False):
        (alone,) = runner.token_vectors([text])
        assert alone.shape == together.shape
        if len(alone):
            assert _cosines(alone, together).min() >= MIN_COSINE


def test_embed_returns_callers_order(runner: BiEncoderRunner) -> None:
    # Internally sorted by length (TEXTS is not), so a mix-up would pair vectors with the wrong texts.
    together = runner.embed(TEXTS, batch_size=5)
    alone = np.stack([runner.embed([text])[0] for text in TEXTS])
    assert _cosines(together, alone).min() >= MIN_COSINE
    reversed_ = runner.embed(TEXTS[::-1], batch_size=7)[::-1]
    assert _cosines(together, reversed_).min() >= MIN_COSINE


def test_concurrent_calls_agree(runner: BiEncoderRunner) -> None:
    expected = runner.embed(TEXTS, batch_size=16)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: runner.embed(TEXTS, batch_size=16), range(4)))
    for got in results:
        assert _cosines(got, expected).min() >= MIN_COSINE


def test_empty_input(runner: BiEncoderRunner) -> None:
    empty = runner.embed([])
    assert empty.shape == (0, runner.dims) and empty.dtype == np.float32
    assert runner.token_vectors([]) == []


def test_manifest_and_identity(runner: BiEncoderRunner) -> None:
    manifest = load_bundle_manifest(BUNDLE)
    assert manifest.kind == "bi_encoder" and manifest.pooling == "mean" and manifest.normalize
    assert manifest.max_length == MAX_LENGTH and manifest.dims == runner.dims == 384
    assert runner.model_id == f"{manifest.name}@{manifest.revision}" == manifest.model_id


def test_broken_bundles_raise_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="directory not found"):
        load_bundle_manifest(tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (broken / name).symlink_to(BUNDLE / name)
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle_manifest(broken)
    (broken / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="cannot read manifest.json"):
        load_bundle_manifest(broken)
    manifest = json.loads((BUNDLE / "manifest.json").read_text(encoding="utf-8"))
    (broken / "manifest.json").write_text(json.dumps({**manifest, "dims": "384"}), encoding="utf-8")
    with pytest.raises(BundleError, match="'dims' should be int"):
        load_bundle_manifest(broken)
    (broken / "manifest.json").write_text(json.dumps({**manifest, "kind": "colbert"}), encoding="utf-8")
    with pytest.raises(BundleError, match="serves kind 'bi_encoder'"):
        BiEncoderRunner(broken)


def test_serving_path_does_not_import_torch() -> None:
    code = (
        "import sys; import sieve_core.models.bi_encoder, sieve_core.models.prepare; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "torch" not in sys.modules, "the test process itself must stay torch-free"


def test_encode_gives_vectors_and_tokens_from_one_run(runner: BiEncoderRunner) -> None:
    texts = ["a short one", "a somewhat longer text about proteins and cells " * 3, "émigré café"]
    vectors, tokens = runner.encode(texts, batch_size=2, tokens=True)
    only_vectors, none = runner.encode(texts, batch_size=3)
    assert none is None and tokens is not None and len(tokens) == 3
    np.testing.assert_allclose(vectors, only_vectors, atol=1e-5)
    for text, rows in zip(texts, tokens, strict=True):
        _, alone = runner.encode([text], tokens=True)
        assert alone is not None
        np.testing.assert_allclose(rows, alone[0], atol=1e-5)
