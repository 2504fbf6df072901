"""Late interaction core: the token blob codec (sieve_core/token_codec.py) and MaxSim
(sieve_core/late_interaction.py), checked with a reference scorer.

Random-data tests check the arithmetic exactly; the real-model tests use the all-MiniLM-L6-v2 bundle's own
token vectors (a few dozen short texts, a few seconds on 2 cores).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from sieve_core import kernels
from sieve_core.late_interaction import (
    BestMatches,
    PackedTokens,
    decode_packed,
    maxsim,
    maxsim_blobs,
    maxsim_naive,
    maxsim_packed,
    pack,
)
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.token_codec import HEADER_BYTES, bytes_per_token, decode_tokens, encode_tokens, read_header

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2"
needs_bundle = pytest.mark.skipif(
    not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}; run `make models`"
)
DIMS = 384


class LateInteractionScorer:
    """A reference scorer for these tests: a runner's token vectors, then MaxSim (packed or from blobs).
    The server scores stored blobs in server/core/tokens.py; this checks the arithmetic it relies on."""

    def __init__(self, runner: BiEncoderRunner) -> None:
        self.runner = runner

    def query_tokens(self, query: str) -> np.ndarray:
        return self.runner.token_vectors([query])[0]

    def document_blobs(self, texts: Sequence[str], fmt: str = "int8") -> list[bytes]:
        return [encode_tokens(m, fmt) for m in self.runner.token_vectors(texts)]

    def score(self, query: str | np.ndarray, docs: Sequence[np.ndarray] | PackedTokens) -> np.ndarray:
        q = self.query_tokens(query) if isinstance(query, str) else query
        packed = docs if isinstance(docs, PackedTokens) else pack(docs, dims=q.shape[1])
        return maxsim_packed(q, packed)

    def score_blobs(self, query: str | np.ndarray, blobs: Sequence[bytes]) -> np.ndarray:
        q = self.query_tokens(query) if isinstance(query, str) else query
        return maxsim_blobs(q, blobs)


def _unit_rows(rng: np.random.Generator, n: int, dims: int = DIMS) -> np.ndarray:
    x = rng.standard_normal((n, dims)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ragged_docs(rng: np.random.Generator) -> list[np.ndarray]:
    lengths = [1, 230, 0, 17, 300, 0, 64, 5]  # empty documents in the middle and (below) at the end
    return [_unit_rows(rng, n) for n in lengths] + [np.zeros((0, DIMS), dtype=np.float32)]


# -- codec ------------------------------------------------------------------------------------------------


def test_int8_round_trip_unit_rows_are_renormalised_within_one_step() -> None:
    x = _unit_rows(np.random.default_rng(1), 230)
    blob = encode_tokens(x, "int8")
    assert len(blob) == HEADER_BYTES + 230 * bytes_per_token("int8", DIMS) == HEADER_BYTES + 230 * 388
    info = read_header(blob)
    assert (info.fmt, info.n_tokens, info.dims, info.unit_norm) == ("int8", 230, DIMS, True)
    y = decode_tokens(blob)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    assert (np.abs(y - x) <= step).all()  # rounding is half a step; re-normalising moves rows by far less
    assert np.abs((y * x).sum(axis=1) - 1).max() < 1e-3  # each decoded token's cosine to its original


def test_int8_round_trip_other_rows_within_half_a_step() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 128)).astype(np.float32) * rng.uniform(0.01, 50, (40, 1)).astype(np.float32)
    x[7] = 0.0  # an all-zero row must survive (no division by a zero peak)
    blob = encode_tokens(x, "int8")
    assert not read_header(blob).unit_norm
    y = decode_tokens(blob)
    half_step = np.abs(x).max(axis=1, keepdims=True) / 254
    assert (np.abs(y - x) <= half_step * (1 + 1e-5) + 1e-7).all()
    assert (y[7] == 0).all()


@pytest.mark.parametrize("dims", [DIMS, 7])  # an odd width pads each row with one nibble
def test_int4_round_trip_packs_two_codes_per_byte_within_half_a_step(dims: int) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((60, dims)).astype(np.float32) * rng.uniform(0.01, 50, (60, 1)).astype(np.float32)
    x[5] = 0.0
    blob = encode_tokens(x, "int4")
    assert (
        len(blob)
        == HEADER_BYTES + 60 * ((dims + 1) // 2 + 4)
        == HEADER_BYTES + 60 * bytes_per_token("int4", dims)
    )
    info = read_header(blob)
    assert (info.fmt, info.n_tokens, info.dims, info.unit_norm) == ("int4", 60, dims, False)
    y = decode_tokens(blob)
    half_step = np.abs(x).max(axis=1, keepdims=True) / 14  # codes -7..7
    assert (np.abs(y - x) <= half_step * (1 + 1e-5) + 1e-7).all()
    assert (y[5] == 0).all()
    # every code value -7..7 survives the packing, in both nibbles
    ramp = np.tile(np.arange(-7, 8, dtype=np.float32), 2)[None, :]
    np.testing.assert_allclose(decode_tokens(encode_tokens(ramp, "int4")), ramp, atol=1e-5)


def test_int4_unit_rows_decode_to_unit_rows_close_to_the_original() -> None:
    x = _unit_rows(np.random.default_rng(12), 100)
    y = decode_tokens(encode_tokens(x, "int4"))
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
    assert (y * x).sum(axis=1).min() > 0.97  # each decoded token's cosine to its original


def test_fp16_round_trip_is_exact_within_fp16() -> None:
    x = _unit_rows(np.random.default_rng(3), 50)
    blob = encode_tokens(x, "fp16")
    assert len(blob) == HEADER_BYTES + 50 * 2 * DIMS
    y = decode_tokens(blob)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_empty_document_round_trips(fmt: str) -> None:
    blob = encode_tokens(np.zeros((0, DIMS), dtype=np.float32), fmt)
    assert len(blob) == HEADER_BYTES
    assert decode_tokens(blob).shape == (0, DIMS)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown token format"):
        encode_tokens(np.zeros((2, 4), dtype=np.float32), "int2")
    with pytest.raises(ValueError, match="2-D"):
        encode_tokens(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        encode_tokens(np.array([[1.0, np.nan]], dtype=np.float32))


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_truncated_or_padded_blobs_raise(fmt: str) -> None:
    blob = encode_tokens(_unit_rows(np.random.default_rng(4), 10), fmt)
    for cut in (0, 3, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, len(blob) - 1):
        with pytest.raises(ValueError, match="truncated"):
            decode_tokens(blob[:cut])
    with pytest.raises(ValueError, match="trailing bytes"):
        decode_tokens(blob + b"\0")


def test_corrupt_headers_raise() -> None:
    blob = encode_tokens(_unit_rows(np.random.default_rng(5), 3), "int8")
    magic, version, fmt, flags, n, dims, reserved = struct.unpack_from("<4sBBHIHH", blob)
    payload = blob[HEADER_BYTES:]

    def with_header(**changes: object) -> bytes:
        fields = {
            "magic": magic,
            "version": version,
            "fmt": fmt,
            "flags": flags,
            "n": n,
            "dims": dims,
            "reserved": reserved,
            **changes,
        }
        return struct.pack("<4sBBHIHH", *fields.values()) + payload

    cases = {
        "not a token blob": with_header(magic=b"JUNK"),
        "version 9": with_header(version=9),
        "unknown format code 7": with_header(fmt=7),
        "corrupt: flags": with_header(flags=0x80),
        "corrupt: flags 0x1, reserved 5": with_header(reserved=5),
        "dims is 0": with_header(dims=0),
        "header says 4 x 384": with_header(n=4),
        "header says 3 x 383": with_header(dims=383),
        "header says 3 x 384 fp16": with_header(fmt=1),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            decode_tokens(bad)
    with pytest.raises(ValueError, match="not a token blob"):
        decode_tokens(b'{"json": "some other value under the key"}')


# -- MaxSim -----------------------------------------------------------------------------------------------


def test_maxsim_equals_naive_reference_on_ragged_documents() -> None:
    rng = np.random.default_rng(6)
    docs = _ragged_docs(rng)
    query = _unit_rows(rng, 24)
    # Reference written out in float64, independently of both implementations.
    q64 = query.astype(np.float64)
    reference = np.array([(q64 @ d.astype(np.float64).T).max(axis=1).sum() if len(d) else 0.0 for d in docs])
    got = maxsim(query, docs)
    assert got.dtype == np.float32 and got.shape == (len(docs),)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maxsim_naive(query, docs), reference, rtol=1e-5, atol=1e-5)
    assert got[2] == got[5] == got[-1] == 0.0  # empty documents
    for chunk_tokens in (1, 64, 10_000):  # a chunk per document, several per chunk, all in one
        np.testing.assert_allclose(maxsim(query, docs, chunk_tokens=chunk_tokens), got, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(maxsim(query[:0], docs), np.zeros(len(docs), dtype=np.float32))
    assert maxsim(query, []).shape == (0,)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_packed_decode_matches_per_document_decode(fmt: str) -> None:
    rng = np.random.default_rng(7)
    docs = _ragged_docs(rng)
    query = _unit_rows(rng, 20)
    blobs = [encode_tokens(d, fmt) for d in docs]
    packed = decode_packed(blobs)
    assert len(packed) == len(docs)
    np.testing.assert_array_equal(packed.matrix, pack([decode_tokens(b) for b in blobs]).matrix)
    decoded = [decode_tokens(b) for b in blobs]
    expected = maxsim_naive(query, decoded)
    np.testing.assert_allclose(maxsim_packed(query, packed), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 100, 2048])
def test_maxsim_straight_from_blobs_matches_decoded(chunk_tokens: int) -> None:
    rng = np.random.default_rng(9)
    docs = _ragged_docs(rng)
    query = _unit_rows(rng, 16)
    blobs = [encode_tokens(d, ("fp16", "int8", "int4")[i % 3]) for i, d in enumerate(docs)]  # mixed formats
    expected = maxsim_naive(query, [decode_tokens(b) for b in blobs])
    got = maxsim_blobs(query, blobs, chunk_tokens=chunk_tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got[2] == got[-1] == 0.0
    assert maxsim_blobs(query, []).shape == (0,)
    with pytest.raises(ValueError, match="truncated"):
        maxsim_blobs(query, [blobs[0], blobs[1][:-1]])
    with pytest.raises(ValueError, match="query dims"):
        maxsim_blobs(query[:, :128], blobs)


needs_integer_kernel = pytest.mark.skipif(
    not kernels.available(), reason="onnxruntime's u8s8 product is not exact on this CPU (no VNNI)"
)


@needs_integer_kernel
def test_integer_kernel_is_exact_on_extreme_codes() -> None:
    rng = np.random.default_rng(21)
    a = rng.integers(0, 256, (300, DIMS), dtype=np.uint8)
    a[:50] = 255
    b = rng.choice(np.array([-127, 127], dtype=np.int8), (DIMS, 24))
    for zero in (0, 8, 128):
        got = kernels.matmul_u8s8(a, b, zero)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, (a.astype(np.int64) - zero) @ b.astype(np.int64))


@needs_integer_kernel
@pytest.mark.parametrize("fmts", [("int8",), ("int4",), ("int8", "int4")])  # the last: zero points change
def test_integer_maxsim_from_blobs_matches_decoded_within_the_query_rounding(
    fmts: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(22)
    docs = _ragged_docs(rng)
    query = _unit_rows(rng, 16)
    blobs = [encode_tokens(d, fmts[i % len(fmts)]) for i, d in enumerate(docs)]
    decoded = [decode_tokens(b) for b in blobs]
    products = []
    real = kernels.matmul_u8s8
    monkeypatch.setattr(kernels, "matmul_u8s8", lambda a, b, z: products.append(z) or real(a, b, z))
    for chunk_tokens in (1, 100, 2048):
        products.clear()
        best: list[BestMatches | None] = [None] * len(blobs)
        got = maxsim_blobs(query, blobs, chunk_tokens=chunk_tokens, best=best)
        assert products, "the integer product did not run"
        assert set(products) == {128 if f == "int8" else 8 for f in fmts}
        # The query is rounded to int8 per token: each of its 16 tokens' similarities moves by well under
        # 2e-3 (half a step of 1/127 of its largest component, over unit rows); the float path is exact.
        exact = maxsim_naive(query, decoded)
        np.testing.assert_allclose(got, exact, atol=16 * 2e-3, rtol=0)
        assert got[2] == got[-1] == 0.0 and best[2] is None and best[-1] is None
        for k, found in enumerate(best):
            if found is None:
                continue
            sims = query @ decoded[k].T  # (q, rows)
            np.testing.assert_allclose(found.sims, sims[np.arange(len(query)), found.rows], atol=2e-3)
            np.testing.assert_allclose(found.sims, sims.max(axis=1), atol=4e-3)  # a near-tie may flip
            np.testing.assert_allclose(found.sims.sum(), got[k], atol=1e-4)
    monkeypatch.setattr(kernels, "available", lambda: False)  # a CPU without the exact product
    np.testing.assert_allclose(maxsim_blobs(query, blobs), maxsim_naive(query, decoded), rtol=1e-5, atol=1e-5)


def test_maxsim_rejects_mismatched_dims() -> None:
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="expected"):
        maxsim(_unit_rows(rng, 4, 128), [_unit_rows(rng, 5)])
    with pytest.raises(ValueError, match="disagree on dims"):
        decode_packed([encode_tokens(_unit_rows(rng, 2, 128)), encode_tokens(_unit_rows(rng, 2))])


# -- cache keys -------------------------------------------------------------------------------------------


# -- real token vectors -----------------------------------------------------------------------------------

DOCS = [
    "Aspirin irreversibly inhibits cyclooxygenase, reducing platelet thromboxane A2 production.",
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Photosynthesis converts light energy into chemical energy in chloroplasts.",
    "Low-dose aspirin lowers the risk of myocardial infarction by blocking platelet aggregation.",
    "Python lists are dynamic arrays with amortised constant-time append.",
    "Vitamin D deficiency is associated with decreased bone mineral density in older adults.",
    "Mutations in the BRCA1 gene increase the lifetime risk of breast and ovarian cancer.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "Statins reduce LDL cholesterol by inhibiting HMG-CoA reductase in the liver.",
    "Sleep deprivation impairs working memory and attention in healthy adults.",
    "The mitochondrion produces ATP through oxidative phosphorylation.",
    "Insulin resistance precedes the onset of type 2 diabetes by several years.",
    "Antibiotic overuse drives the spread of resistant bacterial strains in hospitals.",
    "Regular aerobic exercise lowers resting blood pressure in hypertensive patients.",
    "The Great Barrier Reef suffered mass coral bleaching during marine heatwaves.",
    "CRISPR-Cas9 allows targeted editing of genomic DNA sequences.",
    "Smoking is the leading cause of lung cancer worldwide.",
    "Measles vaccination has prevented millions of childhood deaths.",
    "Gut microbiota composition differs between lean and obese individuals.",
    "Chronic stress elevates cortisol and suppresses immune function.",
]
QUERIES = [
    "aspirin prevents heart attacks by inhibiting platelets",
    "which gene mutation raises breast cancer risk",
    "how do statins lower cholesterol",
]


@pytest.fixture(scope="module")
def scorer() -> LateInteractionScorer:
    return LateInteractionScorer(BiEncoderRunner(BUNDLE))


@pytest.fixture(scope="module")
def doc_tokens(scorer: LateInteractionScorer) -> list[np.ndarray]:
    return scorer.runner.token_vectors(DOCS)


@needs_bundle
def test_maxsim_on_minilm_tokens_ranks_the_relevant_document_first(
    scorer: LateInteractionScorer, doc_tokens: list[np.ndarray]
) -> None:
    few = [doc_tokens[i] for i in (1, 2, 3, 4)]  # Eiffel, photosynthesis, aspirin/infarction, Python
    scores = scorer.score(QUERIES[0], few)
    assert int(np.argmax(scores)) == 2, scores
    for query, relevant in zip(QUERIES, (3, 6, 8), strict=True):
        assert int(np.argmax(scorer.score(query, doc_tokens))) == relevant


@needs_bundle
def test_int8_and_fp16_maxsim_agree_with_fp32_on_minilm_tokens(
    scorer: LateInteractionScorer, doc_tokens: list[np.ndarray]
) -> None:
    blobs8 = scorer.document_blobs(DOCS, "int8")
    for blob, tokens in zip(blobs8, doc_tokens, strict=True):  # the write path encodes what the runner gives
        np.testing.assert_array_equal(decode_tokens(blob), decode_tokens(encode_tokens(tokens, "int8")))
    blobs16 = [encode_tokens(t, "fp16") for t in doc_tokens]
    for query in QUERIES:
        q = scorer.query_tokens(query)
        exact = scorer.score(q, doc_tokens)
        int8 = scorer.score_blobs(q, blobs8)
        fp16 = scorer.score_blobs(query, blobs16)
        # A score is a sum over ~10 query tokens of cosines; int8 moves each by ~1e-4 (see the module doc).
        np.testing.assert_allclose(int8, exact, atol=0.01, rtol=0)
        np.testing.assert_allclose(fp16, exact, atol=2e-3, rtol=0)
        assert np.abs(int8 - exact).mean() < 0.005
        # Same ranking: the top 5 in the same order, and every pair that fp32 separates by more than the
        # int8 error bound in the same order (today the full rankings are identical; the closest pair
        # here is 0.0026 apart, so demanding that of every pair would hinge on single rounding steps).
        for approx in (int8, fp16):
            np.testing.assert_array_equal(np.argsort(-approx)[:5], np.argsort(-exact)[:5])
            separated = (exact[:, None] - exact[None, :]) > 0.01
            assert (approx[:, None] > approx[None, :])[separated].all()
