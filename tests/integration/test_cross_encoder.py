"""Cross-encoder bundles: export of a seeded BertForSequenceClassification, parity with CrossEncoder, int8.

No trained cross-encoder weights are reachable here, so the module builds one of the real architecture:
all-MiniLM-L6-v2's encoder with a seeded one-logit head (export_cross_encoder.py `seed`). Seeding, export
and the sentence-transformers reference (tests/reference/st_cross_encoder.py) all run in subprocesses;
this process never imports torch.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from sieve_core.models.bundle import BundleError, load_bundle_manifest
from sieve_core.models.cross_encoder import CrossEncoderRunner
from sieve_core.models.export import subprocess_env
from sieve_core.models.export_cross_encoder import default_max_length, resolve_activation

REPO = Path(__file__).resolve().parents[2]
REFERENCE_SCRIPT = REPO / "tests" / "reference" / "st_cross_encoder.py"
MAX_LENGTH = 512  # MiniLM's position table; the tokenizer's model_max_length is 512 too
MAX_ABS_DIFF = 1e-4
TIE = 1e-5  # reference scores closer than this may swap places without a ranking being "different"
# Measured here: int8 vs fp32 Spearman 0.98 and top-5 overlap 4/5 on these pairs (scores move by up to
# 0.065, more than the gap between the 5th and 6th document); on SciFact, 15 queries x 30 abstracts,
# Spearman 0.965 and top-5 overlap 4/5 at worst. The thresholds leave room for other CPUs' int8 kernels,
# not for a worse quantization (per-tensor weights: Spearman 0.90, top-5 overlap 3/5 on SciFact).
MIN_INT8_SPEARMAN = 0.9
MIN_INT8_TOP5 = 3
TIMEOUT = 300

ABSTRACT = (
    "Background: Cross-encoders read the query and the document together through full attention. "
    "Methods: We re-ranked the top candidates of a bi-encoder on biomedical claims. "
    "Results: nDCG@10 improved by 4.2 points (95% CI 3.1-5.3) at a cost of 40 ms per pair. "
)
LONG_DOCUMENT = ABSTRACT * 12  # about 600 tokens: truncated to what fits beside the query
LONG_QUERY = (
    "which treatments reduce the risk of recurrent stroke in older adults with atrial fibrillation " * 25
)
QUERY = "does re-ranking with a cross-encoder improve retrieval quality?"
PAIRS: list[tuple[str, str]] = [
    (QUERY, "Re-ranking the top candidates with a cross-encoder improved nDCG@10 on every data set."),
    (QUERY, "Cross-encoders are slower than bi-encoders because nothing can be precomputed."),
    (QUERY, "The recipe calls for two cups of flour and a pinch of salt."),
    (QUERY, "Retrieval quality"),
    (QUERY, ABSTRACT),
    (QUERY, LONG_DOCUMENT),
    (QUERY, ""),
    ("", "A document with no query in front of it."),
    ("", ""),
    (" ", "   whitespace   around\tand\nbetween   "),
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("What is the capital of France?", "Berlin is the capital of Germany."),
    ("What is the capital of France?", "France"),
    (
        "BRCA1 mutation breast cancer risk",
        "Women with a BRCA1 mutation have a 60-70% lifetime breast cancer risk.",
    ),
    ("BRCA1 mutation breast cancer risk", "IL-6, TNF-α and CRP > 10 mg/L at t = 48 h"),
    (
        "COVID-19 vaccine efficacy",
        "In 2021, 1,234,567 people (12.5%) received 2 doses of 30 µg mRNA vaccine.",
    ),
    ("Grüße aus Köln", "Schöne Grüße aus Köln und ein naïve café — Ünïcödé everywhere"),
    ("東京の天気", "東京は晴れ、最高気温は25度です。"),
    ("emoji 🙂 query", "🙂🙃😀 a document of emoji and text 🚀"),
    ("∑ αβγ Σ", "mathematical symbols: ∫ f(x) dx = F(b) - F(a), ∀ε>0 ∃δ>0"),
    ("ThE qUiCk BrOwN fOx", "the quick brown fox jumps over the lazy dog"),
    ("HTTP/2 vs. gRPC-web", "e-mail: someone@example.org; URL: https://example.org/a?b=c&d=e"),
    ("3.14159", "pi is approximately 3.14159 2.71828 is e"),
    (LONG_QUERY, "Anticoagulation lowers the risk of recurrent stroke in atrial fibrillation."),
    (LONG_QUERY, LONG_DOCUMENT),
    ("protein folding structure prediction", "AlphaFold predicts protein structures from sequence."),
    ("protein folding structure prediction", "Stock markets fell sharply on Tuesday."),
    ("a", "b"),
    (
        "why is the sky blue",
        "Rayleigh scattering makes short wavelengths scatter more, so the sky looks blue.",
    ),
    ("why is the sky blue", "The ocean is blue because water absorbs red light."),
    ("sleep deprivation memory", "Sleep loss impairs memory consolidation in the hippocampus."),
    ("sleep deprivation memory", "A new smartphone was released with a larger screen."),
]

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Artifacts:
    checkpoint: Path
    fp32: Path
    int8: Path
    reference: dict[str, object]


def _run(cmd: list[str], what: str) -> str:
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    work = tmp_path_factory.mktemp("cross_encoder")
    checkpoint, fp32 = work / "seeded-ckpt", work / "seeded-ce"
    seed = [sys.executable, "-m", "sieve_core.models.export_cross_encoder", "seed", "--out", str(checkpoint)]
    _run(seed, "building the seeded checkpoint")
    (work / "pairs.json").write_text(json.dumps(PAIRS, ensure_ascii=False), encoding="utf-8")
    # The reference and the export are independent: run them side by side to save wall time.
    reference = subprocess.Popen(
        [sys.executable, str(REFERENCE_SCRIPT), str(checkpoint), str(work / "pairs.json")],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        export = [
            sys.executable,
            "-m",
            "sieve_core.models.export",
            "cross-encoder",
            "--source",
            str(checkpoint),
        ]
        _run([*export, "--out", str(fp32), "--source-label", "seeded:all-MiniLM-L6-v2/0", "--int8"], "export")
        out, err = reference.communicate(timeout=TIMEOUT)
    finally:
        reference.kill()
    assert reference.returncode == 0, f"reference script failed:\n{err[-4000:]}"
    return Artifacts(checkpoint, fp32, fp32.with_name(fp32.name + "-int8"), json.loads(out))


@pytest.fixture(scope="module")
def runner(artifacts: Artifacts) -> CrossEncoderRunner:
    runner = CrossEncoderRunner(artifacts.fp32, intra_op_threads=2)
    runner.warmup()
    return runner


@pytest.fixture(scope="module")
def int8_runner(artifacts: Artifacts) -> CrossEncoderRunner:
    return CrossEncoderRunner(artifacts.int8, intra_op_threads=2)


def _reference_scores(artifacts: Artifacts) -> np.ndarray:
    return np.asarray(artifacts.reference["scores"], dtype=np.float32)


def _same_order(got: np.ndarray, expected: np.ndarray) -> list[tuple[int, int]]:
    """Index pairs whose order differs, among those the reference tells apart by more than TIE."""
    return [
        (i, j)
        for i, j in itertools.combinations(range(len(expected)), 2)
        if abs(expected[i] - expected[j]) > TIE and (expected[i] - expected[j]) * (got[i] - got[j]) <= 0
    ]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def test_pairs_cover_truncation(artifacts: Artifacts) -> None:
    """Some pairs are longer than max_length (truncation is compared), some far shorter (padding)."""
    assert len(PAIRS) >= 30 and len(set(PAIRS)) == len(PAIRS)
    tokenizer = Tokenizer.from_file(str(artifacts.fp32 / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    lengths = [len(tokenizer.encode(query, doc).ids) for query, doc in PAIRS]
    assert max(lengths) > MAX_LENGTH, lengths
    assert min(lengths) < MAX_LENGTH // 4, lengths
    assert artifacts.reference["max_seq_length"] == MAX_LENGTH
    assert artifacts.reference["activation"] == "Sigmoid()"


def test_scores_match_sentence_transformers(runner: CrossEncoderRunner, artifacts: Artifacts) -> None:
    expected = _reference_scores(artifacts)
    got = runner.score_pairs(PAIRS, batch_size=8)
    assert got.shape == expected.shape == (len(PAIRS),) and got.dtype == np.float32
    diff = np.abs(got - expected)
    worst = int(np.argmax(diff))
    assert diff.max() < MAX_ABS_DIFF, (
        f"max abs diff {diff.max():.2e} for pair #{worst}: {PAIRS[worst]!r:.120}"
    )
    assert _same_order(got, expected) == []
    # Scores that differ: a parity test of near-identical numbers would prove little about the head.
    assert expected.max() - expected.min() > 0.1


def test_truncation_drops_the_end_of_long_pairs(runner: CrossEncoderRunner) -> None:
    # Past max_length, more text changes nothing; within it, it does.
    long_pair = runner.score(QUERY, [LONG_DOCUMENT, LONG_DOCUMENT + " Conclusion: a new last sentence."])
    assert long_pair[0] == pytest.approx(long_pair[1], abs=1e-6)
    short_pair = runner.score(QUERY, [ABSTRACT, ABSTRACT + " Conclusion: a new last sentence."])
    assert abs(short_pair[0] - short_pair[1]) > 1e-4
    both_long = runner.score_pairs(
        [(LONG_QUERY, LONG_DOCUMENT), (LONG_QUERY + " more", LONG_DOCUMENT + " more")]
    )
    assert both_long[0] == pytest.approx(both_long[1], abs=1e-6)


def test_manifests(runner: CrossEncoderRunner, int8_runner: CrossEncoderRunner, artifacts: Artifacts) -> None:
    fp32, int8 = load_bundle_manifest(artifacts.fp32), load_bundle_manifest(artifacts.int8)
    assert fp32.kind == int8.kind == "cross_encoder" and fp32.pooling == "none" and fp32.dims == 1
    assert fp32.max_length == MAX_LENGTH and fp32.output_name == "logits"
    assert fp32.options == {"activation": "sigmoid"}
    assert int8.options == {"activation": "sigmoid", "max_batch_size": 1}
    assert int8.exported_with["quantization"] == "onnxruntime.quantization.quantize_dynamic"
    # Same weights, different models: the int8 bundle must never share a cache key with the fp32 one.
    assert fp32.revision == int8.revision and runner.model_id != int8_runner.model_id
    assert int8.name == f"{fp32.name}-int8" and fp32.source == "seeded:all-MiniLM-L6-v2/0"


def test_int8_ranks_like_fp32(runner: CrossEncoderRunner, int8_runner: CrossEncoderRunner) -> None:
    documents = [d for q, d in PAIRS if q == QUERY] + [d for _, d in PAIRS[10:24]]
    fp32, int8 = runner.score(QUERY, documents), int8_runner.score(QUERY, documents)
    top5 = len(set(np.argsort(-fp32)[:5]) & set(np.argsort(-int8)[:5]))
    spearman = _spearman(fp32, int8)
    print(
        f"int8 vs fp32: Spearman {spearman:.4f}, top-5 overlap {top5}/5, max abs {np.abs(fp32 - int8).max():.4f}"
    )
    assert spearman >= MIN_INT8_SPEARMAN and top5 >= MIN_INT8_TOP5
    assert _spearman(runner.score_pairs(PAIRS), int8_runner.score_pairs(PAIRS)) >= MIN_INT8_SPEARMAN


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_scores_do_not_depend_on_the_batch(
    which: str, runner: CrossEncoderRunner, int8_runner: CrossEncoderRunner
) -> None:
    chosen = runner if which == "fp32" else int8_runner
    alone = np.concatenate([chosen.score_pairs([pair]) for pair in PAIRS])
    for batch_size in (3, len(PAIRS)):
        np.testing.assert_allclose(chosen.score_pairs(PAIRS, batch_size=batch_size), alone, atol=1e-5)


def test_scores_come_back_in_the_callers_order(runner: CrossEncoderRunner) -> None:
    # Batches are sorted by length inside; PAIRS is not, so a mix-up would swap scores between pairs.
    documents = [d for _, d in PAIRS]
    together = runner.score(QUERY, documents, batch_size=5)
    np.testing.assert_allclose(runner.score(QUERY, documents[::-1], batch_size=7)[::-1], together, atol=1e-6)
    for index in (0, 5, 6, 17):
        assert runner.score(QUERY, [documents[index]])[0] == pytest.approx(together[index], abs=1e-6)


def test_no_documents(runner: CrossEncoderRunner) -> None:
    for empty in (runner.score(QUERY, []), runner.score_pairs([]), runner.logits([])):
        assert empty.shape == (0,) and empty.dtype == np.float32
    with pytest.raises(ValueError, match="batch_size"):
        runner.score(QUERY, ["x"], batch_size=0)


def _copy_bundle(source: Path, target: Path, **manifest_changes: object) -> Path:
    target.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (target / name).symlink_to(source / name)
    manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
    (target / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}), encoding="utf-8")
    return target


def test_identity_activation_serves_logits(
    runner: CrossEncoderRunner, artifacts: Artifacts, tmp_path: Path
) -> None:
    raw = CrossEncoderRunner(
        _copy_bundle(artifacts.fp32, tmp_path / "raw", options={"activation": "identity"})
    )
    short = [pair for pair in PAIRS if len(pair[0]) + len(pair[1]) < 200]
    logits = raw.score_pairs(short)
    np.testing.assert_allclose(logits, runner.logits(short), atol=1e-6)
    sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(sigmoid, runner.score_pairs(short), atol=1e-6)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "bi_encoder"}, "serves kind 'cross_encoder'"),
        ({"pooling": "mean"}, "serves kind 'cross_encoder'"),
        ({"dims": 2}, "one logit per pair"),
        ({"options": {}}, "options.activation must be one of"),
        ({"options": {"activation": "softmax"}}, "options.activation must be one of"),
        ({"options": {"activation": "sigmoid", "query_length": 32}}, "unknown cross-encoder options"),
        (
            {"options": {"activation": "sigmoid", "max_batch_size": 0}},
            "max_batch_size must be a positive int",
        ),
        ({"input_names": ["input_ids", "attention_mask"]}, "do not match the graph"),
        ({"input_names": ["input_ids", "pixel_values"]}, "cannot feed inputs"),
        ({"output_name": "last_hidden_state"}, "do not match the graph"),
    ],
)
def test_broken_bundles_raise_bundle_error(
    changes: dict[str, object], message: str, artifacts: Artifacts, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match=message):
        CrossEncoderRunner(_copy_bundle(artifacts.fp32, tmp_path / "broken", **changes))


def test_missing_files_raise_bundle_error(artifacts: Artifacts, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="directory not found"):
        CrossEncoderRunner(tmp_path / "absent")
    bundle = _copy_bundle(artifacts.fp32, tmp_path / "no-tokenizer")
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        CrossEncoderRunner(bundle)


def test_activation_and_length_follow_sentence_transformers(tmp_path: Path) -> None:
    def folder(name: str, config: dict[str, object], st_config: dict[str, object] | None = None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        if st_config is not None:
            (path / "config_sentence_transformers.json").write_text(json.dumps(st_config), encoding="utf-8")
        return path

    identity = "torch.nn.modules.linear.Identity"
    assert resolve_activation(folder("plain", {}), 1)[0] == "sigmoid"
    assert resolve_activation(folder("st6", {}, {"activation_fn": identity}), 1)[0] == "identity"
    assert (
        resolve_activation(folder("st4", {"sentence_transformers": {"activation_fn": identity}}), 1)[0]
        == "identity"
    )
    assert (
        resolve_activation(folder("legacy", {"sbert_ce_default_activation_function": identity}), 1)[0]
        == "identity"
    )
    # CrossEncoder ignores a path outside torch unless trust_remote_code: so do we.
    assert resolve_activation(folder("remote", {}, {"activation_fn": "my_pkg.Custom"}), 1)[0] == "sigmoid"
    with pytest.raises(BundleError, match="--activation"):
        resolve_activation(folder("tanh", {}, {"activation_fn": "torch.nn.modules.activation.Tanh"}), 1)

    sentinel = folder("sentinel", {"max_position_embeddings": 512})
    (sentinel / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": int(1e30)}), encoding="utf-8"
    )
    assert default_max_length(sentinel) == 512
    (sentinel / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 300}), encoding="utf-8")
    assert default_max_length(sentinel) == 300


def test_export_refuses_a_bad_source(artifacts: Artifacts, tmp_path: Path) -> None:
    source = tmp_path / "no-weights"
    shutil.copytree(artifacts.checkpoint, source, ignore=shutil.ignore_patterns("*.safetensors"))
    cmd = [sys.executable, "-m", "sieve_core.models.export", "cross-encoder", "--source", str(source)]
    cmd += ["--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no weights file" in done.stderr
    assert not (tmp_path / "out").exists()


def test_serving_path_does_not_import_torch(artifacts: Artifacts) -> None:
    code = (
        "import sys; import sieve_core.models.cross_encoder as ce, sieve_core.models.export_cross_encoder; "
        f"ce.check_bundle({str(artifacts.int8)!r}); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    out = _run([sys.executable, "-c", code], "torch-free serving")
    assert out.startswith("check: ") and "torch not imported" in out
    assert "torch" not in sys.modules, "the test process itself must stay torch-free"
