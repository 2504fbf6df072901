"""sieve_core.token_format: pooling, projection and the version-2 blob header."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from sieve_core.late_interaction import maxsim, maxsim_blobs
from sieve_core.token_codec import decode_tokens, encode_tokens, read_header
from sieve_core.token_format import (
    DEFAULT_TOKEN_FORMAT,
    TokenFormat,
    check_blob,
    compress,
    compress_many,
    pool_tokens,
    prepare_query,
    projection_matrix,
)

pytestmark = pytest.mark.unit

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2"
needs_bundle = pytest.mark.skipif(
    not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}; run `make models`"
)
DIMS = 384


def _unit_rows(rng: np.random.Generator, n: int, dims: int = DIMS) -> np.ndarray:
    x = rng.standard_normal((n, dims)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("factor", [2, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 2, 5, 59, 238])
def test_pooling_keeps_ceil_n_over_factor_unit_rows(factor: int, n: int) -> None:
    rows = _unit_rows(np.random.default_rng(n * 10 + factor), n)
    pooled = pool_tokens(rows, factor)
    assert pooled.shape == (math.ceil(n / factor), DIMS)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    info = read_header(compress(rows, TokenFormat(pool_factor=factor)))
    assert (info.n_tokens, info.pool_factor, info.unit_norm) == (math.ceil(n / factor), factor, True)


def test_pooling_is_deterministic_and_matches_fcluster_maxclust() -> None:
    rows = _unit_rows(np.random.default_rng(1), 200)
    first, second = pool_tokens(rows, 4), pool_tokens(rows.copy(), 4)
    np.testing.assert_array_equal(first, second)
    assert compress(rows) == compress(rows.copy())
    # Same partition as scipy's own cut (no tied heights in random data): same cluster means.
    labels = fcluster(linkage(rows.astype(np.float64), method="ward"), 50, criterion="maxclust")
    means = np.stack([rows[labels == c].mean(axis=0) for c in np.unique(labels)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    key = lambda m: np.lexsort(np.round(m, 5).T)  # noqa: E731  # order-free comparison
    np.testing.assert_allclose(first[key(first)], means[key(means)], atol=1e-5)


def test_pooling_merges_near_duplicate_tokens_first() -> None:
    rng = np.random.default_rng(2)
    base = _unit_rows(rng, 10)
    noisy = base + 1e-3 * rng.standard_normal(base.shape).astype(np.float32)
    rows = np.concatenate([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    pooled = pool_tokens(rows, 2)  # 20 rows -> 10: each pair must become one cluster
    assert (pooled @ base.T).max(axis=0).min() > 0.999


def test_factor_one_is_the_plain_codec() -> None:
    rows = _unit_rows(np.random.default_rng(3), 64)
    fmt = TokenFormat(pool_factor=1, codec="int8")
    assert compress(rows, fmt) == encode_tokens(rows, "int8")
    assert read_header(compress(rows, fmt)).pool_factor == 1
    assert compress_many([rows, rows[:3]], fmt) == [encode_tokens(rows), encode_tokens(rows[:3])]
    four = TokenFormat(pool_factor=1, codec="int4")
    assert compress(rows, four) == encode_tokens(rows, "int4")


def test_empty_document_compresses_to_an_empty_blob() -> None:
    empty = np.zeros((0, DIMS), dtype=np.float32)
    for fmt in (DEFAULT_TOKEN_FORMAT, TokenFormat(pool_factor=2, projection_dims=128)):
        info = read_header(compress(empty, fmt))
        assert info.n_tokens == 0 and info.dims == fmt.out_dims(DIMS)


def test_projection_is_orthonormal_deterministic_and_seeded() -> None:
    p = projection_matrix(DIMS, 128, 0)
    assert p.shape == (DIMS, 128)
    np.testing.assert_allclose(p.T @ p, np.eye(128), atol=1e-5)
    projection_matrix.cache_clear()
    np.testing.assert_array_equal(p, projection_matrix(DIMS, 128, 0))
    assert not np.allclose(p, projection_matrix(DIMS, 128, 1))
    rows = _unit_rows(np.random.default_rng(4), 30)
    fmt = TokenFormat(pool_factor=1, projection_dims=128, projection_seed=7, codec="int8")
    blob = compress(rows, fmt)
    info = read_header(blob)
    assert (info.dims, info.projection_seed, info.pool_factor) == (128, 7, 1)
    decoded = decode_tokens(blob)
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=1), 1.0, atol=1e-5)
    query = prepare_query(rows[:5], fmt)
    assert query.shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(query, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(decoded[:5], query, atol=0.02)  # int8 rounding only


def test_queries_are_never_pooled() -> None:
    rows = _unit_rows(np.random.default_rng(5), 24)
    np.testing.assert_array_equal(prepare_query(rows, TokenFormat(pool_factor=4)), rows)


def test_format_json_round_trip_describe_and_validation() -> None:
    fmt = TokenFormat(pool_factor=2, projection_dims=128, projection_seed=3)
    assert TokenFormat.from_json(fmt.to_json()) == fmt
    assert TokenFormat.from_json({}) == DEFAULT_TOKEN_FORMAT
    assert DEFAULT_TOKEN_FORMAT.describe() == "int4, pool 2"
    assert fmt.describe() == "int4, pool 2, projection 128"
    assert TokenFormat(pool_factor=1, codec="int8").describe() == "int8"
    for bad in ({"pool_factor": 0}, {"projection_dims": -1}, {"codec": "int2"}, {"projection_seed": 256}):
        with pytest.raises(ValueError):
            TokenFormat(**bad)
    with pytest.raises(ValueError, match="unknown token format fields"):
        TokenFormat.from_json({"pool": 2})


def test_check_blob_rejects_a_blob_of_another_format() -> None:
    rows = _unit_rows(np.random.default_rng(6), 40)
    check_blob(compress(rows), DEFAULT_TOKEN_FORMAT, DIMS)
    with pytest.raises(ValueError, match="does not match"):
        check_blob(compress(rows, TokenFormat(pool_factor=4)), DEFAULT_TOKEN_FORMAT, DIMS)
    with pytest.raises(ValueError, match="does not match"):  # the same pooling, another codec
        check_blob(compress(rows, TokenFormat(pool_factor=2, codec="int8")), DEFAULT_TOKEN_FORMAT, DIMS)
    with pytest.raises(ValueError, match="does not match"):
        check_blob(encode_tokens(rows), DEFAULT_TOKEN_FORMAT, DIMS)  # an old, unpooled version-1 blob


def test_version_2_header_corruption_is_caught() -> None:
    blob = bytearray(compress(_unit_rows(np.random.default_rng(7), 12)))
    blob[14] = 0  # pool factor 0
    with pytest.raises(ValueError, match="corrupt"):
        read_header(blob)
    blob = bytearray(compress(_unit_rows(np.random.default_rng(7), 12)))
    blob[15] = 5  # a seed without the projected flag
    with pytest.raises(ValueError, match="corrupt"):
        read_header(blob)


DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair.",
    "Photosynthesis converts light energy into chemical energy stored in glucose in plant chloroplasts.",
    "Aspirin irreversibly inhibits cyclooxygenase in platelets, lowering the risk of myocardial infarction.",
    "BRCA1 and BRCA2 mutations greatly increase the lifetime risk of breast and ovarian cancer in women.",
    "Statins lower LDL cholesterol by inhibiting HMG-CoA reductase, the rate-limiting enzyme in the liver.",
    "Python is a high-level programming language whose design emphasises code readability and simplicity.",
] * 2
QUERIES = [
    "aspirin prevents heart attacks by inhibiting platelets",
    "which gene mutation raises breast cancer risk",
    "how do statins lower cholesterol",
]


@needs_bundle
def test_pooled_maxsim_is_close_to_unpooled_on_minilm_tokens() -> None:
    from sieve_core.models.bi_encoder import BiEncoderRunner

    runner = BiEncoderRunner(BUNDLE)
    docs = runner.token_vectors(DOCS[:6])
    for query, relevant in zip(QUERIES, (2, 3, 4), strict=True):
        q = runner.token_vectors([query])[0]
        exact = maxsim(q, docs) / len(q)  # mean over query tokens of the best cosine
        for factor in (2, 4):
            pooled = maxsim_blobs(q, compress_many(docs, TokenFormat(pool_factor=factor))) / len(q)
            # Mean best cosine per query token. These texts are short (~20 tokens, so factor 4 leaves ~5
            # rows) and lose most on the matching document (measured max 0.09 / mean 0.03 at factor 2,
            # 0.19 / 0.06 at factor 4);
            # SciFact's 238-token documents lose far less (bench/token_formats.py measures nDCG).
            error = np.abs(pooled - exact)
            assert error.max() < 0.05 * factor and error.mean() < 0.02 * factor, (factor, pooled, exact)
            assert int(np.argmax(pooled)) == relevant
        fmt = TokenFormat(pool_factor=2, projection_dims=128)
        projected = maxsim_blobs(prepare_query(q, fmt), compress_many(docs, fmt))
        assert int(np.argmax(projected)) == relevant
