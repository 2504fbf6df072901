"""Late interaction (ColBERT-style MaxSim) over precomputed document token vectors.

The second search stage re-ranks the first stage's candidates with

    score(q, d) = sum over query tokens i of  max over document tokens j of  q_i . d_j

where the document side is computed once, at write time, and stored as a compact blob (see
sieve_core.token_codec), so a warm re-rank costs one query encoding plus one matrix product.

Speed of MaxSim for 100 candidates x ~230 tokens x 384 dims and a 24-token query (2 cores, numpy with
OpenBLAS, medians): one GEMM over an already packed matrix 5.4 ms; `maxsim` (documents copied a chunk at
a time into a reused 2048-token buffer, one GEMM + `np.maximum.reduceat` per chunk) 6.5 ms; a naive
per-document loop 7.8 ms (p90s near 100 ms when the other core was busy); packing all 37 MB first, then
one GEMM, 11.4 ms. From int8 blobs, `maxsim_blobs` 6.1 ms against 12.7 ms for `decode_packed` + GEMM.
fp16 blobs decode ~3x slower than int8 (numpy's float16 cast is not vectorised here) at twice the bytes.
With candidates drawn from a larger pool (cold caches) and one other busy process on the 2 cores, 2-thread
OpenBLAS went to 14-16 ms medians with p90s up to ~100 ms, while one BLAS thread kept `maxsim_blobs` at
8.3 ms (p90 8.5) and `maxsim` at 8.7 ms: where encoders share the cores, run this with one BLAS thread
(OPENBLAS_NUM_THREADS=1 in the worker, or threadpoolctl) and parallelise across requests instead.

Integer blobs (int8, int4) are scored with integer products where the CPU does them exactly
(sieve_core.kernels: onnxruntime's u8s8 GEMM on VNNI): the codes go into the chunk buffer as uint8 (code
plus a zero point), the query is rounded to int8 with one scale per token. 100 SciFact documents in the
default int4 pool 2 format, one thread: 2.45 ms against 5.86 ms for float32 products (bench/evidence_cost.py,
both per query); nDCG@10 unchanged to 4 decimals (bench/hybrid_late_ablation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sieve_core import kernels
from sieve_core.token_codec import INTEGER_FORMATS, decode_into, int_codes, read_header, unsigned_codes

# -- packed documents ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedTokens:
    """Several documents' token rows in one float32 matrix: document i is rows offsets[i]:offsets[i+1]."""

    matrix: np.ndarray  # (total_tokens, dims) float32
    offsets: np.ndarray  # (n_docs + 1,) int64, offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1


def pack(docs: Sequence[np.ndarray], dims: int | None = None) -> PackedTokens:
    """Concatenates per-document matrices (one copy) for `maxsim_packed`."""
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if dims is None:
        dims = docs[0].shape[1] if docs else 0
    matrix = np.empty((int(offsets[-1]), dims), dtype=np.float32)
    for i, doc in enumerate(docs):
        if doc.ndim != 2 or doc.shape[1] != dims:
            raise ValueError(f"document {i}: token matrix shape {doc.shape}, expected (n, {dims})")
        matrix[offsets[i] : offsets[i + 1]] = doc
    return PackedTokens(matrix, offsets)


def decode_packed(blobs: Sequence[bytes | bytearray | memoryview]) -> PackedTokens:
    """Decodes many blobs straight into one matrix (no per-document arrays, no second copy)."""
    infos = [read_header(b) for b in blobs]
    dims = {i.dims for i in infos}
    if len(dims) > 1:
        raise ValueError(f"token blobs disagree on dims: {sorted(dims)}")
    width = dims.pop() if dims else 0
    offsets = np.concatenate([[0], np.cumsum([i.n_tokens for i in infos], dtype=np.int64)]).astype(np.int64)
    matrix = np.empty((int(offsets[-1]), width), dtype=np.float32)
    for k, (blob, info) in enumerate(zip(blobs, infos, strict=True)):
        decode_into(blob, info, matrix[offsets[k] : offsets[k + 1]])
    return PackedTokens(matrix, offsets)


# -- MaxSim ---------------------------------------------------------------------------------------------


def maxsim_packed(query_tokens: np.ndarray, docs: PackedTokens) -> np.ndarray:
    """MaxSim of one query against documents already in one matrix: one GEMM, then a segmented max.

    A document with no tokens scores 0.0 (no query token finds evidence), as does every document
    for a query with no tokens.
    """
    q = np.asarray(query_tokens, dtype=np.float32)
    n_docs = len(docs)
    if q.ndim != 2:
        raise ValueError(f"query tokens must be 2-D (n_tokens, dims), got shape {q.shape}")
    if docs.matrix.shape[0] and q.shape[1] != docs.matrix.shape[1]:
        raise ValueError(f"query dims {q.shape[1]} != document dims {docs.matrix.shape[1]}")
    scores = np.zeros(n_docs, dtype=np.float32)
    lengths = np.diff(docs.offsets)
    nonempty = np.flatnonzero(lengths > 0)
    if len(q) == 0 or len(nonempty) == 0:
        return scores
    # (total_tokens, q): rows of one document are contiguous, so reduceat over axis 0 is a segmented max.
    # Empty documents own no rows, so the starts of the non-empty ones delimit exactly their segments.
    sims = docs.matrix @ q.T
    best = np.maximum.reduceat(sims, docs.offsets[nonempty], axis=0)
    scores[nonempty] = best.sum(axis=1)
    return scores


CHUNK_TOKENS = 2048  # float32 rows: 3 MB of 384-d rows
INTEGER_CHUNK_TOKENS = 8192  # uint8 rows: the same 3 MB, a quarter of the product calls

# Writes the rows of the documents `members` (their indexes, in order), unscaled, one after another into
# `rows` and their per-row scales into `scales`; returns the rows' zero point (the integer path's code
# offset; 0 for float rows).
_FillChunk = Callable[[Sequence[int], np.ndarray, np.ndarray], int]


@dataclass(frozen=True)
class BestMatches:
    """MaxSim's argmax for one document: for each query token, the stored row that scored best and its
    similarity (what the score sums). Empty arrays for a document with no rows."""

    rows: np.ndarray  # (query tokens,) int
    sims: np.ndarray  # (query tokens,) float32


class _FloatProduct:
    """float32 rows times the float32 query (numpy's sgemm)."""

    dtype = np.float32

    def __init__(self, q: np.ndarray) -> None:
        self.qt = np.ascontiguousarray(q.T)
        self.q_scales: np.ndarray | None = None

    def __call__(self, rows: np.ndarray, zero: int) -> np.ndarray:
        return rows @ self.qt


class _IntegerProduct:
    """uint8 codes (code + zero point) times the query quantised to int8 with one scale per query token
    (as the int8 blobs' rows): exact int32 products (sieve_core.kernels), scaled afterwards. Quantising
    the query moves each query token's similarity by ~5e-4 (its rounding, against ~1.5e-3 for the int8
    rows'); the per-token query scale multiplies each token's best similarity once, after the max."""

    dtype = np.uint8

    def __init__(self, q: np.ndarray) -> None:
        peak = np.abs(q).max(axis=1)
        safe = np.where(peak > 0, peak, 1.0).astype(np.float32)
        self.qt = np.ascontiguousarray(np.rint(q * (127.0 / safe)[:, None]).astype(np.int8).T)
        self.q_scales: np.ndarray | None = safe / 127.0

    def __call__(self, rows: np.ndarray, zero: int) -> np.ndarray:
        return kernels.matmul_u8s8(rows, self.qt, zero).astype(np.float32)


def _maxsim_chunked(
    q: np.ndarray,
    lengths: Sequence[int],
    fill: _FillChunk,
    chunk_tokens: int,
    best: list[BestMatches | None] | None = None,
    *,
    integer: bool = False,
    groups: Sequence[object] | None = None,
) -> np.ndarray:
    """The kernel behind `maxsim` and `maxsim_blobs`: documents are copied (or decoded) a chunk at a time
    into one reused buffer, then one matrix product and one segmented max per chunk.

    A chunk of 2048 x 384 float32 is 3 MB and stays in cache, where packing 100 SciFact abstracts at once
    would write 37 MB of fresh memory first; and per-document products (the naive loop) pay BLAS call
    and thread start-up overhead 100 times, which on a busy 2-core machine showed p90s of ~100 ms.
    `integer`: the rows are uint8 codes and the product is the integer one (`_IntegerProduct`).
    `groups`: per document, what a chunk must share (the integer path: the blob format, which decides
    the zero point); a chunk ends where it changes.
    """
    if q.ndim != 2:
        raise ValueError(f"query tokens must be 2-D (n_tokens, dims), got shape {q.shape}")
    scores = np.zeros(len(lengths), dtype=np.float32)
    if len(q) == 0 or not any(lengths):
        return scores
    product = _IntegerProduct(q) if integer else _FloatProduct(q)
    capacity = max(chunk_tokens, max(lengths))
    buffer = np.empty((capacity, q.shape[1]), dtype=product.dtype)
    row_scales = np.empty(capacity, dtype=np.float32)
    members: list[int] = []  # the non-empty documents in the current chunk
    starts: list[int] = []
    used = 0
    group: object = None

    columns = np.arange(len(q))

    def flush() -> None:
        zero = fill(members, buffer[:used], row_scales[:used])
        sims = product(buffer[:used], zero)  # (tokens, q): each document's rows are one contiguous segment
        sims *= row_scales[:used, None]
        maxima = np.maximum.reduceat(sims, starts, axis=0)
        if product.q_scales is not None:
            maxima *= product.q_scales
        scores[members] = maxima.sum(axis=1)
        if best is not None:  # the argmax behind each max (evidence spans): ~3 us per document
            for k, start in zip(members, starts, strict=True):
                segment = sims[start : start + lengths[k]]
                rows = segment.argmax(axis=0)
                found = segment[rows, columns]
                best[k] = BestMatches(rows, found if product.q_scales is None else found * product.q_scales)

    for k, n in enumerate(lengths):
        if n == 0:
            continue  # scores 0.0
        kind = None if groups is None else groups[k]
        if members and (used + n > capacity or kind != group):
            flush()
            members.clear()
            starts.clear()
            used = 0
        group = kind
        members.append(k)
        starts.append(used)
        used += n
    if members:
        flush()
    return scores


def _per_document(lengths: Sequence[int], fill: Callable[[int, np.ndarray, np.ndarray], None]) -> _FillChunk:
    """A chunk filler from a per-document one (float rows: zero point 0)."""

    def fill_chunk(members: Sequence[int], rows: np.ndarray, scales: np.ndarray) -> int:
        at = 0
        for k in members:
            fill(k, rows[at : at + lengths[k]], scales[at : at + lengths[k]])
            at += lengths[k]
        return 0

    return fill_chunk


def maxsim(
    query_tokens: np.ndarray, doc_tokens: Sequence[np.ndarray], *, chunk_tokens: int = CHUNK_TOKENS
) -> np.ndarray:
    """MaxSim of one query (q, d) against each document (t_i, d): float32 scores, one per document.

    A document with no tokens scores 0.0, as does every document for a query with no tokens.
    """
    q = np.asarray(query_tokens, dtype=np.float32)
    dims = q.shape[-1]
    for i, d in enumerate(doc_tokens):
        if d.ndim != 2 or d.shape[1] != dims:
            raise ValueError(f"document {i}: token matrix shape {d.shape}, expected (n, {dims})")

    def fill(k: int, rows: np.ndarray, scales: np.ndarray) -> None:
        rows[...] = doc_tokens[k]
        scales.fill(1.0)

    lengths = [len(d) for d in doc_tokens]
    return _maxsim_chunked(q, lengths, _per_document(lengths, fill), chunk_tokens)


def maxsim_naive(query_tokens: np.ndarray, doc_tokens: Sequence[np.ndarray]) -> np.ndarray:
    """Reference: one small product per document. Same results as `maxsim`, slower (see the bench)."""
    q = np.asarray(query_tokens, dtype=np.float32)
    out = np.zeros(len(doc_tokens), dtype=np.float32)
    for i, d in enumerate(doc_tokens):
        if len(d) and len(q):
            out[i] = (q @ np.asarray(d, dtype=np.float32).T).max(axis=1).sum()
    return out


def maxsim_blobs(
    query_tokens: np.ndarray,
    blobs: Sequence[bytes | bytearray | memoryview],
    *,
    chunk_tokens: int | None = None,
    best: list[BestMatches | None] | None = None,
) -> np.ndarray:
    """MaxSim straight from stored blobs, the re-rank path: the scores of
    `maxsim_packed(q, decode_packed(blobs))`, at about the cost of MaxSim alone.

    Integer rows are never decoded to floats: the per-token scale multiplies the (tokens, q) similarities
    instead of the (tokens, dims) rows. When every blob is int8 or int4 and the exact integer product runs
    here, the products are integer ones with the query rounded to int8 (each query token's similarity
    moves by < 2e-3); otherwise float32, equal to the decoded rows' to float rounding. Raises ValueError
    on any bad blob before doing any arithmetic.
    `best`: a list of len(blobs) Nones, filled with each document's `BestMatches` (None: no rows).
    `chunk_tokens`: rows per product (default: CHUNK_TOKENS float32, INTEGER_CHUNK_TOKENS uint8 rows).
    """
    q = np.asarray(query_tokens, dtype=np.float32)
    infos = [read_header(b) for b in blobs]
    for info in infos:
        if q.ndim == 2 and info.dims != q.shape[1]:
            raise ValueError(f"query dims {q.shape[1]} != document dims {info.dims}")

    integer = bool(infos) and all(i.fmt in INTEGER_FORMATS for i in infos) and kernels.available()
    lengths = [i.n_tokens for i in infos]
    if integer:

        def fill_chunk(members: Sequence[int], rows: np.ndarray, scales: np.ndarray) -> int:
            return unsigned_codes([blobs[k] for k in members], [infos[k] for k in members], rows, scales)

        chunk = INTEGER_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
        groups = [i.fmt for i in infos]
        return _maxsim_chunked(q, lengths, fill_chunk, chunk, best, integer=True, groups=groups)

    def fill(k: int, rows: np.ndarray, scales: np.ndarray) -> None:
        blob, info = blobs[k], infos[k]
        if info.fmt in INTEGER_FORMATS:
            rows[...], scales[...] = int_codes(blob, info)
        else:
            decode_into(blob, info, rows)
            scales.fill(1.0)

    chunk = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    return _maxsim_chunked(q, lengths, _per_document(lengths, fill), chunk, best)
