"""ColBERT (colbert-ir layout): export and serving, by parity with the reference implementation.

No trained ColBERT weights are reachable here, so the module builds a local checkpoint of exactly that
layout (all-MiniLM-L6-v2 encoder + a seeded 384 -> 128 projection, `export_colbert seed`), exports it
with `python -m sieve_core.models.export colbert`, and compares the bundle's token vectors and MaxSim
scores with colbert-ai's on the same checkpoint (tests/reference/colbert_embed.py).

PyLate is compared too when SIEVE_PYLATE_PYTHON names a Python that has it. It cannot share .venv (every
release pins older sentence-transformers and transformers, and fast-plaid another torch); a side venv
that works, with the same torch:

    python3.11 -m venv /tmp/pylate-venv
    /tmp/pylate-venv/bin/pip install torch==2.13.0 sentence-transformers==5.3.0 transformers==5.3.0 \
        ujson==5.12.0 pandas scipy safetensors datasets accelerate
    /tmp/pylate-venv/bin/pip install --no-deps pylate==1.6.0   # its index back-ends are not needed

Seeding, export and references run in subprocesses: this process never imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sieve_core.late_interaction import maxsim
from sieve_core.models.bundle import BundleError, load_bundle_manifest, weights_revision
from sieve_core.models.colbert import ColbertRunner
from sieve_core.models.colbert_checkpoint import read_settings
from sieve_core.models.export import subprocess_env

REPO = Path(__file__).resolve().parents[2]
REFERENCE_SCRIPT = REPO / "tests" / "reference" / "colbert_embed.py"
PYLATE_PYTHON = os.environ.get("SIEVE_PYLATE_PYTHON")
MIN_COSINE = 0.9999
SCORE_ATOL = 1e-4  # a score sums 32 cosines; measured differences are below 1e-5
QUERY_MAXLEN = 32
DOC_MAXLEN = 180
DIMS = 128

QUERIES = [
    "hello",
    "",
    "What is the capital of France?",
    "BRCA1 mutation, breast-cancer risk: what's known (2023)?",
    "how do late interaction models such as colbert compare with cross encoders and bi encoders on "
    "retrieval benchmarks when the query is much longer than thirty two word pieces",
    "Grüße aus München — naïve café? 東京の天気",
    "?!...",
    "I love this 😍🔥 so much",
]
LONG_ABSTRACT = (
    "Background: Late interaction models encode queries and documents separately into token vectors. "
    "Methods: We measured retrieval quality on biomedical claims with several encoders and cascades. "
) * 8
DOCUMENTS = [
    "Paris is the capital and most populous city of France.",
    "Hello, world! (yes) — it's [really] {the} same; isn't it? ... \"quoted\" 'text' / back\\slash "
    "@#$%^&*~`|<>=+_-",
    "",
    "!!! ??? ... ;;; ::: ((( )))",
    LONG_ABSTRACT,
    "Grüße aus Köln: Straße, Mädchen. 北京大学的研究人员发现了新的蛋白质结构。Привет, как дела?",
    "In 2023, 1,234,567 people (12.5%) received 2 doses of 50 mg.",
    "BRCA1 mutations increase breast cancer risk substantially.",
    "The mitochondrion is the powerhouse of the cell.",
]


@dataclass
class Reference:
    library: str
    queries: list[np.ndarray]
    documents: list[np.ndarray]
    scores: np.ndarray  # (queries, documents), from the library's own scoring


@dataclass
class Built:
    checkpoint: Path
    bundle: Path
    references: dict[str, Reference | str]  # library -> result, or why it is unavailable


def _run(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(proc: subprocess.Popen[str], what: str) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"{what} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def _load_reference(out: str, npz: Path) -> Reference:
    # colbert-ai prints a faiss warning on stdout; the summary is the last line.
    summary = json.loads(out.strip().splitlines()[-1])
    arrays = np.load(npz)
    return Reference(
        library=summary["library"],
        queries=[arrays[f"q{i}"] for i in range(len(QUERIES))],
        documents=[arrays[f"d{i}"] for i in range(len(DOCUMENTS))],
        scores=np.asarray(summary["scores"], dtype=np.float32),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    # find_spec locates the package without importing it (importing would pull in torch here).
    if importlib.util.find_spec("colbert") is None:
        pytest.fail("the colbert-ai reference is missing: pip install colbert-ai==0.2.22 (export extra)")
    work = tmp_path_factory.mktemp("colbert")
    checkpoint, bundle = work / "checkpoint", work / "bundle"
    seed = [sys.executable, "-m", "sieve_core.models.export_colbert", "seed", "--out", str(checkpoint)]
    _wait(_run(seed), "seeding the checkpoint")
    texts = work / "texts.json"
    texts.write_text(json.dumps({"queries": QUERIES, "documents": DOCUMENTS}), encoding="utf-8")
    export = [sys.executable, "-m", "sieve_core.models.export", "colbert", "--source", str(checkpoint)]
    export += ["--out", str(bundle), "--name", "colbert-seeded-minilm"]
    pythons = {"colbert-ai": sys.executable, "pylate": PYLATE_PYTHON}
    # Export and references in parallel: independent processes, and the module's main cost.
    procs = {"export": _run(export)}
    for library, python in pythons.items():
        if python:
            cmd = [python, str(REFERENCE_SCRIPT), str(checkpoint), str(texts), str(work / f"{library}.npz")]
            procs[library] = _run([*cmd, "--library", library])
    _wait(procs.pop("export"), "export")
    references: dict[str, Reference | str] = {"pylate": "set SIEVE_PYLATE_PYTHON to a Python with PyLate"}
    for library, proc in procs.items():
        references[library] = _load_reference(_wait(proc, f"reference {library}"), work / f"{library}.npz")
    return Built(checkpoint, bundle, references)


@pytest.fixture(scope="module", params=["colbert-ai", "pylate"])
def reference(request: pytest.FixtureRequest, built: Built) -> Reference:
    found = built.references[request.param]
    if isinstance(found, str):
        pytest.skip(f"{request.param} reference not run: {found}")
    return found


@pytest.fixture(scope="module")
def runner(built: Built) -> ColbertRunner:
    return ColbertRunner(built.bundle)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _assert_same_rows(ours: list[np.ndarray], theirs: list[np.ndarray], texts: list[str]) -> None:
    for text, mine, ref in zip(texts, ours, theirs, strict=True):
        assert mine.shape == ref.shape, f"{text[:40]!r}: {mine.shape} vs reference {ref.shape}"
        assert mine.dtype == np.float32
        assert _row_cosines(mine, ref).min() > MIN_COSINE, f"{text[:40]!r}"


def test_query_vectors_match_reference(runner: ColbertRunner, reference: Reference) -> None:
    ours = runner.query_token_vectors(QUERIES, batch_size=3)
    # Every query, empty or longer than the limit, is [CLS] [Q] ... [SEP] + [MASK]s: exactly 32 rows.
    assert {q.shape for q in ours} == {(QUERY_MAXLEN, DIMS)}
    _assert_same_rows(ours, reference.queries, QUERIES)


def test_document_vectors_match_reference(runner: ColbertRunner, reference: Reference) -> None:
    ours = runner.document_token_vectors(DOCUMENTS, batch_size=4)
    _assert_same_rows(ours, reference.documents, DOCUMENTS)
    # [CLS] [D] [SEP] only: the empty text, and punctuation (encoded, but skipped in the output).
    assert len(ours[2]) == len(ours[3]) == 3
    assert 100 < len(ours[4]) <= DOC_MAXLEN  # truncated, then its punctuation dropped


def test_maxsim_scores_and_ranking_match_reference(runner: ColbertRunner, reference: Reference) -> None:
    docs = runner.document_token_vectors(DOCUMENTS)
    ours = np.stack([maxsim(q, docs) for q in runner.query_token_vectors(QUERIES)])
    np.testing.assert_allclose(ours, reference.scores, atol=SCORE_ATOL, rtol=0)
    for i, query in enumerate(QUERIES):
        ranking = np.argsort(-ours[i], kind="stable")
        assert ranking.tolist() == np.argsort(-reference.scores[i], kind="stable").tolist(), query


def test_batch_size_and_order_do_not_change_vectors(runner: ColbertRunner) -> None:
    for encode, texts in (
        (runner.query_token_vectors, QUERIES),
        (runner.document_token_vectors, DOCUMENTS),
    ):
        together = encode(texts, batch_size=16)
        alone = [encode([t])[0] for t in texts]
        reversed_ = encode(texts[::-1], batch_size=2)[::-1]
        for a, b, c in zip(together, alone, reversed_, strict=True):
            assert a.shape == b.shape == c.shape
            assert min(_row_cosines(a, b).min(), _row_cosines(a, c).min()) > MIN_COSINE


def test_concurrent_calls_agree(runner: ColbertRunner) -> None:
    expected = runner.document_token_vectors(DOCUMENTS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: runner.document_token_vectors(DOCUMENTS, batch_size=3), range(4)))
    for got in results:
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape and _row_cosines(a, b).min() > MIN_COSINE


def test_empty_input(runner: ColbertRunner) -> None:
    assert runner.query_token_vectors([]) == [] and runner.document_token_vectors([]) == []
    with pytest.raises(ValueError, match="batch_size"):
        runner.query_token_vectors(["x"], batch_size=0)


def test_manifest_and_identity(built: Built, runner: ColbertRunner) -> None:
    manifest = load_bundle_manifest(built.bundle)
    assert manifest.kind == "colbert" and manifest.pooling == "none" and manifest.normalize
    assert (manifest.max_length, manifest.dims, runner.dims) == (DOC_MAXLEN, DIMS, DIMS)
    assert manifest.revision == weights_revision(built.checkpoint)
    assert runner.model_id == manifest.model_id == f"colbert-seeded-minilm@{manifest.revision}"
    opts = runner.options
    assert (opts.query_marker, opts.query_marker_id, opts.document_marker, opts.document_marker_id) == (
        "[unused0]",
        1,
        "[unused1]",
        2,
    )
    assert opts.query_max_length == QUERY_MAXLEN and opts.query_expansion and not opts.attend_to_expansion
    assert opts.mask_token_id == 103 and len(opts.skiplist_ids) == 32  # string.punctuation in BERT's vocab


def _variant(built: Built, tmp_path: Path, **changes: object) -> Path:
    """A copy of the bundle (model linked, not copied) with its manifest changed."""
    copy = tmp_path / "variant"
    copy.mkdir()
    (copy / "model.onnx").symlink_to(built.bundle / "model.onnx")
    shutil.copy2(built.bundle / "tokenizer.json", copy / "tokenizer.json")
    manifest = json.loads((built.bundle / "manifest.json").read_text(encoding="utf-8"))
    options = {**manifest["options"], **changes.pop("options", {})}  # type: ignore[dict-item]
    manifest = {**manifest, **changes, "options": options}
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return copy


def test_expansion_tokens_are_not_attended_to(built: Built, runner: ColbertRunner, tmp_path: Path) -> None:
    """Without attention to the [MASK]s, the query's own rows are those of the unexpanded query;
    `attend_to_expansion` changes them. Checks the attention mask the runner feeds, not just shapes."""
    query = "what is the capital of france"
    expanded = runner.query_token_vectors([query])[0]
    plain = ColbertRunner(_variant(built, tmp_path, options={"query_expansion": False}))
    own = plain.query_token_vectors([query])[0]
    assert len(own) == 2 + 6 + 1  # [CLS] [Q] six words [SEP]
    assert _row_cosines(own, expanded[: len(own)]).min() > MIN_COSINE
    shutil.rmtree(tmp_path / "variant")
    attending = ColbertRunner(_variant(built, tmp_path, options={"attend_to_expansion": True}))
    assert _row_cosines(attending.query_token_vectors([query])[0], expanded).min() < 0.99


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "bi_encoder"}, "serves kind 'colbert'"),
        ({"options": {"query_marker_id": 5}}, "tokenizer does not fit"),
        ({"options": {"mask_token_id": 10**6}}, "outside the vocabulary"),
        ({"options": {"query_max_length": "32"}}, "'query_max_length' has a bad value"),
        ({"options": {"skiplist_ids": [1.5]}}, "'skiplist_ids' has a bad value"),
        ({"options": {"surprise": 1}}, r"unknown \['surprise'\]"),
        ({"output_name": "last_hidden_state"}, "output 'last_hidden_state'"),
        ({"input_names": ["input_ids", "attention_mask", "token_type_ids"]}, "takes"),
    ],
)
def test_broken_bundles_raise_bundle_error(
    built: Built, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        ColbertRunner(_variant(built, tmp_path, **changes))


def test_settings_come_from_artifact_metadata_with_overrides(built: Built, tmp_path: Path) -> None:
    settings = read_settings(built.checkpoint)
    assert (settings.query_maxlen, settings.doc_maxlen, settings.dim) == (QUERY_MAXLEN, DOC_MAXLEN, DIMS)
    assert (settings.query_marker, settings.doc_marker) == ("[unused0]", "[unused1]")
    assert settings.skip_punctuation and settings.query_expansion and not settings.attend_to_expansion
    overridden = read_settings(
        built.checkpoint, {"doc_maxlen": 300, "attend_to_expansion": True, "dim": None}
    )
    assert overridden.doc_maxlen == 300 and overridden.attend_to_expansion
    with pytest.raises(BundleError, match="not a colbert-ir checkpoint"):
        read_settings(tmp_path)
    (tmp_path / "artifact.metadata").write_text(json.dumps({"similarity": "l2"}), encoding="utf-8")
    with pytest.raises(BundleError, match="not supported"):
        read_settings(tmp_path)


def test_serving_path_does_not_import_torch(built: Built) -> None:
    code = (
        "import sys; import sieve_core.models.export_colbert; from sieve_core.models.colbert import "
        f"ColbertRunner; r = ColbertRunner({str(built.bundle)!r}); r.warmup(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "torch" not in sys.modules, "the test process itself must stay torch-free"
