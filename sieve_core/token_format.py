"""How a collection stores its documents' token vectors: pooling, projection, codec.

A document's L2-normalised token rows (n, dims), as `BiEncoderRunner.encode(..., tokens=True)` returns
them, become one blob of the SVTK codec (sieve_core.token_codec) in three steps:

1. Token pooling (factor f > 1): Ward hierarchical clustering of the document's rows, cut into exactly
   ceil(n / f) clusters; each cluster's mean, re-normalised, is one stored row. Similar tokens (repeated
   words, sub-word pieces of one word, punctuation) collapse first, so MaxSim loses little: on SciFact,
   factor 4 keeps nDCG@10 0.708 against 0.709 unpooled at a quarter of the bytes (REFERENCE.md; reproduce
   with `bench/token_formats.py`).
2. Projection (projection_dims > 0): the rows times a fixed random matrix with orthonormal columns
   (dims x projection_dims, from numpy's PCG64 seeded with `projection_seed`), re-normalised. Dot products
   are preserved in expectation only, which costs more nDCG than pooling for the bytes saved (0.697 at
   384 -> 128); it is an option, not the default.
3. The codec: int4 (the default) or int8 with a per-token scale, or fp16, whose header (version 2) records
   the pooling factor and the projection seed, so a stored blob can be checked against its collection's
   format.

The default, int4 with pooling factor 2, was chosen by measurement (bench/hybrid_late_ablation.py, SciFact):
at the same 22.8 KB per document as int8 pooled by 4 it ranks better, hybrid+late nDCG@10 0.7135 against
0.7096 (fp32 unpooled: 0.7123), and dense+late 0.7094 against 0.7081; its MaxSim reads twice the rows
(2.2 against 1.2 ms for 100 candidates with integer products, bench/results/hybrid_late_ablation.json).

Queries are never pooled: `prepare_query` only projects (and re-normalises) them, so that query and
document rows live in the same space.

Cost of `compress` with the default format, one 238-token SciFact-sized document, 2 cores: 1.4 ms with
one OpenBLAS thread (distances 0.5 ms, Ward linkage 0.4 ms, cut and means 0.4 ms, codec 0.2 ms); with
OpenBLAS's default 2 threads on a busy machine the medians went to 4-12 ms (thread hand-offs around
small GEMMs), so callers in a busy process should limit BLAS to one thread (OPENBLAS_NUM_THREADS=1 or
threadpoolctl), as for MaxSim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import linkage

from sieve_core.token_codec import FORMATS, TokenBlobInfo, encode_tokens, read_header

_NORM_EPS = 1e-12
_MAX_POOL_FACTOR = 0xFF  # one header byte
_MAX_SEED = 0xFF  # one header byte


@dataclass(frozen=True)
class TokenFormat:
    """A collection's token-vector format, chosen at creation and recorded with the collection."""

    pool_factor: int = 2  # 1 = no pooling
    projection_dims: int = 0  # 0 = none; else project to this many dims (seeded orthonormal)
    codec: str = "int4"
    projection_seed: int = 0  # which fixed matrix; recorded in each projected blob's header

    def __post_init__(self) -> None:
        if not 1 <= self.pool_factor <= _MAX_POOL_FACTOR:
            raise ValueError(f"token pool factor must be 1..{_MAX_POOL_FACTOR}, got {self.pool_factor}")
        if self.projection_dims < 0:
            raise ValueError(
                f"token projection dims must be 0 (none) or positive, got {self.projection_dims}"
            )
        if self.codec not in FORMATS:
            raise ValueError(f"unknown token codec {self.codec!r}; expected one of {sorted(FORMATS)}")
        if not 0 <= self.projection_seed <= _MAX_SEED:
            raise ValueError(f"token projection seed must be 0..{_MAX_SEED}, got {self.projection_seed}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenFormat:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown token format fields {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        parts = [self.codec]
        if self.pool_factor > 1:
            parts.append(f"pool {self.pool_factor}")
        if self.projection_dims:
            parts.append(f"projection {self.projection_dims}")
        return ", ".join(parts)

    def out_dims(self, dims: int) -> int:
        """Width of the stored rows for model rows of `dims`."""
        return self.projection_dims or dims


DEFAULT_TOKEN_FORMAT = TokenFormat()


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _NORM_EPS)).astype(np.float32)


def pool_tokens(rows: np.ndarray, factor: int) -> np.ndarray:
    """Ward clustering of one document's rows into ceil(n / factor) re-normalised means (see
    `pool_tokens_with_members`)."""
    return pool_tokens_with_members(rows, factor)[0]


def pool_tokens_with_members(rows: np.ndarray, factor: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ward clustering of one document's rows into ceil(n / factor) clusters -> re-normalised means.

    The tree is cut after exactly n - k merges (a union-find over the linkage's first rows), which is
    what `fcluster(Z, k, "maxclust")` returns except when merge heights tie, where fcluster may give
    fewer than k clusters: so the stored size depends only on n. Clusters come out ordered by their first
    token, so the result is deterministic (Ward linkage itself is). Also returns, per pooled row, the
    indices of its member tokens in increasing order (evidence spans are stored per member).
    """
    x = np.asarray(rows, dtype=np.float32)
    n = len(x)
    k = math.ceil(n / factor)
    if factor == 1 or k >= n:
        # nothing merged: the rows as given (so factor 1 is exactly the plain codec)
        return x, [np.array([i]) for i in range(n)]
    merges = linkage(_pairwise_distances(x), method="ward")  # (n - 1, 4): cluster ids a, b, height, size
    parent = list(range(2 * n - 1))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for step in range(n - k):
        a, b = int(merges[step, 0]), int(merges[step, 1])
        parent[root(a)] = parent[root(b)] = n + step
    labels = np.array([root(i) for i in range(n)])
    members = np.argsort(labels, kind="stable")  # tokens grouped by cluster, each group in token order
    grouped = labels[members]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    sums = np.add.reduceat(x[members], starts, axis=0)  # ~5x faster than np.add.at
    order = np.argsort(members[starts])  # clusters ordered by their first token
    groups = np.split(members, starts[1:])
    return _normalize(sums[order]), [groups[i] for i in order]


@lru_cache(maxsize=8)
def _upper_triangle(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def _pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Condensed Euclidean distances (as scipy's pdist, which `linkage` would otherwise run on the raw
    rows) from one float32 GEMM: 0.3 ms instead of 3.5 ms on 238 x 384 rows here (a float64 GEMM had
    erratic medians near 10 ms on the busy 2 cores). Float32 rounding (~1e-7) can only reorder merges of
    near-equal height, which changes nothing that matters for pooling."""
    sq_norms = np.einsum("ij,ij->i", x, x)
    sq = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)
    return np.sqrt(np.maximum(sq[_upper_triangle(len(x))], 0.0)).astype(np.float64)


@lru_cache(maxsize=16)
def projection_matrix(dims: int, out_dims: int, seed: int) -> np.ndarray:
    """The fixed (dims, out_dims) matrix with orthonormal columns: QR of a seeded Gaussian matrix, signs
    fixed by R's diagonal so the result depends only on (dims, out_dims, seed)."""
    if not 0 < out_dims <= dims:
        raise ValueError(f"projection to {out_dims} dims from {dims}: must be 1..{dims}")
    gauss = np.random.Generator(np.random.PCG64(seed)).standard_normal((dims, out_dims))
    q, r = np.linalg.qr(gauss)
    q *= np.sign(np.diag(r))[None, :]
    out = q.astype(np.float32)
    out.setflags(write=False)
    return out


def _project(rows: np.ndarray, fmt: TokenFormat) -> np.ndarray:
    if not fmt.projection_dims:
        return rows
    return _normalize(rows @ projection_matrix(rows.shape[1], fmt.projection_dims, fmt.projection_seed))


def _shape(rows: np.ndarray, fmt: TokenFormat) -> tuple[np.ndarray, list[np.ndarray]]:
    x = np.asarray(rows, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"token rows must be 2-D (n_tokens, dims), got shape {x.shape}")
    pooled, members = pool_tokens_with_members(x, fmt.pool_factor)
    return _project(pooled, fmt), members


def compress(
    rows: np.ndarray, fmt: TokenFormat = DEFAULT_TOKEN_FORMAT, spans: np.ndarray | None = None
) -> bytes:
    """One document's L2-normalised token rows (n, dims) -> pooled, projected, re-normalised, encoded blob.

    `spans`: the tokens' (start, end) offsets in Unicode code points of the document's text, (n, 2), one
    per row of `rows` (`BiEncoderRunner.token_offsets`); given, the blob records for each stored row the
    spans of the tokens it stands for (codec version 3), from which search reports evidence.
    """
    shaped, members = _shape(rows, fmt)
    row_spans = None
    if spans is not None:
        offsets = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        if len(offsets) != len(rows):
            raise ValueError(f"{len(offsets)} token spans for {len(rows)} token rows")
        # Special tokens ([CLS], [SEP], ColBERT's [D]) stand for no text: (0, 0) spans are left out, and
        # a row's members are stored in text order (a cluster's token order is not always text order).
        row_spans = [sorted((int(a), int(b)) for a, b in offsets[group] if b > a) for group in members]
    return encode_tokens(
        shaped,
        fmt.codec,
        pool_factor=fmt.pool_factor,
        projection_seed=fmt.projection_seed if fmt.projection_dims else None,
        spans=row_spans,
    )


def compress_many(
    rows: Sequence[np.ndarray],
    fmt: TokenFormat = DEFAULT_TOKEN_FORMAT,
    spans: Sequence[np.ndarray] | None = None,
) -> list[bytes]:
    if spans is None:
        return [compress(r, fmt) for r in rows]
    return [compress(r, fmt, s) for r, s in zip(rows, spans, strict=True)]


def prepare_query(rows: np.ndarray, fmt: TokenFormat = DEFAULT_TOKEN_FORMAT) -> np.ndarray:
    """The query's token rows in the stored documents' space: projected if the format projects, never
    pooled (every query token is a MaxSim term)."""
    x = np.asarray(rows, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"query token rows must be 2-D (n_tokens, dims), got shape {x.shape}")
    return _project(x, fmt)


def check_blob(blob: bytes | bytearray | memoryview, fmt: TokenFormat, dims: int) -> TokenBlobInfo:
    """Reads a stored blob's header and checks it was written in `fmt` for model rows of `dims`."""
    info = read_header(blob)
    seed = fmt.projection_seed if fmt.projection_dims else None
    if (info.fmt, info.pool_factor, info.projection_seed, info.dims) != (
        fmt.codec,
        fmt.pool_factor,
        seed,
        fmt.out_dims(dims),
    ):
        raise ValueError(
            f"token blob ({info.fmt}, pool {info.pool_factor}, projection seed {info.projection_seed}, "
            f"{info.dims} dims) does not match the collection's format ({fmt.describe()}, "
            f"{fmt.out_dims(dims)} dims)"
        )
    return info
