"""The token-vector blob: one document's token vectors (and, from version 3, the parts of its text they
stand for) as one self-describing byte string. Written once per document at write time, stored with it,
and read by MaxSim (sieve_core.late_interaction) and by evidence (sieve_core.evidence) at query time.

Blob format (little-endian), version 1:

    offset size  field
    0      4     magic b"SVTK"
    4      1     version (1)
    5      1     format: 1 = fp16, 2 = int8, 3 = int4
    6      2     flags: bit 0 = rows were unit-norm when encoded and decode to unit norm
    8      4     n_tokens (uint32)
    12     2     dims (uint16)
    14     2     reserved, 0
    16     ...   fp16: n_tokens x dims float16, row-major
                 int8: n_tokens float32 scales, then n_tokens x dims int8, row-major
                 int4: n_tokens float32 scales, then n_tokens x ceil(dims / 2) bytes: codes -7..7 stored
                       plus 8, byte j of a row = column j (low nibble) | column j + ceil(dims / 2) (high)

Version 2 (written only for pooled or projected rows, see sieve_core.token_format; plain rows stay
version 1, byte for byte) has the same layout and says how the rows were made, so a stored blob can be
checked against its collection's format: flags bit 1 = the rows were projected by the seeded random
orthonormal matrix whose seed is byte 15 (0 when not projected); byte 14 = the token pooling factor
(1 = none). Both versions are read.

int8 is symmetric, one scale per token: code = round(x / max|x| * 127), so every token uses the full
[-127, 127] range whatever its magnitude. The stored scale is the factor that turns the codes back into
the decoded row. For rows that were unit-norm when encoded (what `BiEncoderRunner.token_vectors` and
ColBERT models produce) the stored scale is 1 / ||codes||, so decoding yields unit-norm rows again at no
decode-time cost: MaxSim then stays a sum of cosines, as with the fp32 vectors. Other rows decode to the
plain reconstruction, codes x max|x| / 127.

Measured on all-MiniLM-L6-v2 token vectors (150 SciFact abstracts, 30 queries; mean |MaxSim error| vs
fp32, summed over query tokens): re-normalised rows 1.51e-3, plain reconstruction 1.59e-3, least-squares
scale 1.53e-3; a float16 scale adds about 2 % to either (1.54e-3 / 1.62e-3). fp16 rows: 4.9e-5.
So unit-norm rows are re-normalised, and the scale is float32: 2 more bytes per token than float16
(388 instead of 386 bytes per 384-d token, +0.5 %) for one error source fewer.

int4 is the same with codes in [-7, 7] (code = round(x / max|x| * 7)), half the bytes of int8 per row. On
SciFact (bench/hybrid_late_ablation.py) int4 rows pooled by 2 rank better than int8 rows pooled by 4 at the
same bytes (hybrid+late nDCG@10 0.7135 vs 0.7096, 22.8 vs 22.7 KB per document): finer pooling keeps more
than the coarser codes lose. It is the default codec (sieve_core.token_format).

fp16 rows are stored as given (the flag is then informational: they decode to unit norm within fp16).

There is no checksum: computing one over ~90 KB per candidate would cost more than MaxSim itself. The
header is checked strictly (magic, version, format, flags, sizes, exact length), which catches the
failures a store or cache realistically produces: truncation, a foreign value, an old format.

Version 3 (issue 15: evidence spans) is version 2 followed by a spans section that says which parts of the
document's text each stored row stands for: after the rows, a uint32 byte count L, then L bytes. For each
stored row in order: a varint m (its member tokens: 1 unpooled, the cluster's size when pooled), then per
member, in text order, two varints: its start minus the previous member's start in the same row (the
first: minus 0) and its length, both in Unicode code points of the document's text (the tokenizer's
offsets: a Python str's indices). About 2.5 bytes per original token: ~600 bytes per SciFact abstract,
2-3 % of a pooled int8 blob. Versions 1 and 2 (no spans) are still read; their hits carry no evidence.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"SVTK"
CODEC_VERSION = 1  # what plain rows are written as
CODEC_VERSION_SHAPED = 2  # pooled and/or projected rows: bytes 14-15 say how (see the module doc)
CODEC_VERSION_SPANS = 3  # version 2 + the rows' text spans after the payload (see the module doc)
_READABLE_VERSIONS = (CODEC_VERSION, CODEC_VERSION_SHAPED, CODEC_VERSION_SPANS)
_SPANS_LENGTH = struct.Struct("<I")
FORMATS: dict[str, int] = {"fp16": 1, "int8": 2, "int4": 3}
_FORMAT_NAMES = {code: name for name, code in FORMATS.items()}
_HEADER = struct.Struct("<4sBBHIHH")
HEADER_BYTES = _HEADER.size  # 16
FLAG_UNIT_NORM = 1
FLAG_PROJECTED = 2  # version 2 only
_KNOWN_FLAGS = FLAG_UNIT_NORM
_KNOWN_FLAGS_V2 = FLAG_UNIT_NORM | FLAG_PROJECTED
# Rows whose norms all lie within this of 1 are treated as unit-norm (float32 rounding is ~1e-7).
_UNIT_NORM_TOLERANCE = 1e-3
_NORM_EPS = 1e-12
_MAX_DIMS = 0xFFFF
_MAX_TOKENS = 0xFFFFFFFF
INT8_ZERO = 128  # unsigned_codes: int8 codes + 128
INT4_ZERO = 8  # int4 codes are stored + 8
INTEGER_FORMATS = ("int8", "int4")  # a per-token scale and integer codes (unsigned_codes, int_codes)


def bytes_per_token(fmt: str, dims: int) -> int:
    """Payload bytes per token for a format (the header adds HEADER_BYTES once per document)."""
    if fmt == "fp16":
        return 2 * dims
    if fmt == "int8":
        return dims + 4
    if fmt == "int4":
        return (dims + 1) // 2 + 4
    raise ValueError(f"unknown token format {fmt!r}; expected one of {sorted(FORMATS)}")


def encode_tokens(
    matrix: np.ndarray,
    fmt: str = "int8",
    *,
    pool_factor: int = 1,
    projection_seed: int | None = None,
    spans: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> bytes:
    """One document's token matrix (n_tokens, dims) -> a self-describing blob (see the module doc).

    `pool_factor` and `projection_seed` only label the rows (sieve_core.token_format made them); with
    their defaults the blob is version 1, as before. `spans`: per row, the (start, end) code-point
    offsets of the text it stands for (version 3).
    """
    if spans is not None and len(spans) != len(matrix):
        raise ValueError(f"{len(spans)} rows of spans for {len(matrix)} token rows")
    if not 1 <= pool_factor <= 0xFF:
        raise ValueError(f"pool factor {pool_factor} out of range 1..255")
    if projection_seed is not None and not 0 <= projection_seed <= 0xFF:
        raise ValueError(f"projection seed {projection_seed} out of range 0..255")
    if fmt not in FORMATS:
        raise ValueError(f"unknown token format {fmt!r}; expected one of {sorted(FORMATS)}")
    x = np.asarray(matrix)
    if x.ndim != 2:
        raise ValueError(f"token matrix must be 2-D (n_tokens, dims), got shape {x.shape}")
    n, dims = x.shape
    if not 0 < dims <= _MAX_DIMS or n > _MAX_TOKENS:
        raise ValueError(f"token matrix shape {x.shape} out of range (dims 1..{_MAX_DIMS})")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("token matrix contains NaN or infinity")
    norms = np.linalg.norm(x, axis=1)
    unit = n > 0 and bool(np.all(np.abs(norms - 1.0) <= _UNIT_NORM_TOLERANCE))
    flags = FLAG_UNIT_NORM if unit else 0
    if pool_factor == 1 and projection_seed is None and spans is None:
        header = _HEADER.pack(MAGIC, CODEC_VERSION, FORMATS[fmt], flags, n, dims, 0)
    else:
        if projection_seed is not None:
            flags |= FLAG_PROJECTED
        shape = pool_factor | ((projection_seed or 0) << 8)  # little-endian: byte 14, then byte 15
        version = CODEC_VERSION_SHAPED if spans is None else CODEC_VERSION_SPANS
        header = _HEADER.pack(MAGIC, version, FORMATS[fmt], flags, n, dims, shape)
    tail = b"" if spans is None else _encode_spans(spans)
    if fmt == "fp16":
        return header + np.ascontiguousarray(x, dtype="<f2").tobytes() + tail
    top = 127.0 if fmt == "int8" else 7.0
    peak = np.abs(x).max(axis=1) if n else np.zeros(0, dtype=np.float32)
    safe_peak = np.where(peak > 0, peak, 1.0).astype(np.float32)
    codes = np.rint(x * (top / safe_peak)[:, None]).clip(-top, top).astype(np.int8)
    if unit:
        code_norms = np.linalg.norm(codes.astype(np.float32), axis=1)
        scales = 1.0 / np.maximum(code_norms, _NORM_EPS)
    else:
        scales = peak / top
    payload = codes.tobytes() if fmt == "int8" else _pack_nibbles(codes)
    return header + np.ascontiguousarray(scales, dtype="<f4").tobytes() + payload + tail


def _pack_nibbles(codes: np.ndarray) -> bytes:
    """int4 rows: codes in [-7, 7] stored plus 8 (1..15), two per byte: byte j of a row holds column j in its
    low nibble and column j + ceil(dims / 2) in its high nibble (an odd width gets one zero code at the
    end), so that unpacking writes two contiguous halves."""
    n, dims = codes.shape
    width = (dims + 1) // 2
    padded = np.full((n, 2 * width), INT4_ZERO, dtype=np.uint8)
    padded[:, :dims] = codes + INT4_ZERO
    return (padded[:, :width] | (padded[:, width:] << 4)).tobytes()


def unsigned_codes(
    blobs: Sequence[bytes | bytearray | memoryview],
    infos: Sequence[TokenBlobInfo],
    out: np.ndarray,
    scales: np.ndarray,
) -> int:
    """Several (at least one) int8 or int4 blobs of one format and width, their rows one after another: the codes into
    `out` (total rows, dims) uint8 as code + zero point, the form an unsigned-by-signed integer GEMM takes
    (sieve_core.late_interaction), and the per-token scales into `scales`; returns the zero point (128 for
    int8, 8 for int4). The payloads are joined first, so the unpacking is two array operations for all
    the blobs rather than a few per blob (a few microseconds each, 100 candidates a search)."""
    fmt, dims = infos[0].fmt, infos[0].dims
    if fmt not in INTEGER_FORMATS or any((i.fmt, i.dims) != (fmt, dims) for i in infos):
        raise ValueError(f"unsigned_codes takes blobs of one integer format and width, got {fmt} and others")
    width = dims if fmt == "int8" else (dims + 1) // 2
    scale_parts, code_parts = [], []
    for blob, info in zip(blobs, infos, strict=True):
        view, n = memoryview(blob), info.n_tokens
        scale_parts.append(view[HEADER_BYTES : HEADER_BYTES + 4 * n])
        code_parts.append(view[HEADER_BYTES + 4 * n : HEADER_BYTES + 4 * n + n * width])
    scales[...] = np.frombuffer(b"".join(scale_parts), dtype="<f4")
    packed = np.frombuffer(b"".join(code_parts), dtype=np.uint8).reshape(-1, width)
    if fmt == "int8":
        np.bitwise_xor(packed, 0x80, out=out)  # two's complement + 128, as uint8
        return INT8_ZERO
    np.bitwise_and(packed, 0x0F, out=out[:, :width])
    np.right_shift(packed[:, : dims - width], 4, out=out[:, width:])
    return INT4_ZERO


def int_codes(blob: bytes | bytearray | memoryview, info: TokenBlobInfo) -> tuple[np.ndarray, np.ndarray]:
    """An int8 or int4 blob's codes as int8 (n_tokens, dims) and its per-token float32 scales: the
    decoded rows are codes x scales[:, None]."""
    n, dims = info.n_tokens, info.dims
    if info.fmt == "int8":
        scales = np.frombuffer(blob, dtype="<f4", count=n, offset=HEADER_BYTES)
        codes = np.frombuffer(blob, dtype=np.int8, count=n * dims, offset=HEADER_BYTES + 4 * n)
        return codes.reshape(n, dims), scales
    unsigned, scales = np.empty((n, dims), dtype=np.uint8), np.empty(n, dtype=np.float32)
    zero = unsigned_codes([blob], [info], unsigned, scales)
    return (unsigned.astype(np.int16) - zero).astype(np.int8), scales


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _encode_spans(spans: Sequence[Sequence[tuple[int, int]]]) -> bytes:
    body = bytearray()
    for members in spans:
        _varint(len(members), body)
        previous = 0
        for start, end in members:
            if start < previous or end < start:
                raise ValueError(f"token span ({start}, {end}) is out of order in its row")
            _varint(start - previous, body)
            _varint(end - start, body)
            previous = start
    return _SPANS_LENGTH.pack(len(body)) + bytes(body)


def decode_spans(
    blob: bytes | bytearray | memoryview, rows: Sequence[int] | None = None
) -> list[list[tuple[int, int]]]:
    """The (start, end) code-point spans each stored row stands for ([] per row for a blob without
    spans). With `rows`, only those rows' spans are kept (the others are skipped over), in `rows` order."""
    info = read_header(blob)
    if not info.spans_bytes:
        return [[] for _ in (range(info.n_tokens) if rows is None else rows)]
    data = np.frombuffer(blob, dtype=np.uint8, offset=len(blob) - info.spans_bytes + _SPANS_LENGTH.size)
    values = _varints(data).tolist()
    # The section is, per row: its member count m, then m (start delta, length) pairs. The varints are
    # decoded at once; only the rows up to the last one wanted are walked, one count each.
    wanted = None if rows is None else set(rows)
    last = info.n_tokens if wanted is None else min(max(wanted, default=-1) + 1, info.n_tokens)
    found: dict[int, list[tuple[int, int]]] = {}
    pos = 0
    for row in range(last):
        count = values[pos]
        if wanted is None or row in wanted:
            members, start = [], 0
            for j in range(pos + 1, pos + 1 + 2 * count, 2):
                start += values[j]
                members.append((start, start + values[j + 1]))
            found[row] = members
        pos += 1 + 2 * count
    order = range(info.n_tokens) if rows is None else rows
    return [found.get(r, []) for r in order]


def span_values(blobs: Sequence[bytes | bytearray | memoryview]) -> tuple[np.ndarray, np.ndarray]:
    """The spans sections of several blobs, their varints decoded in one pass (a reply's evidence reads
    every hit's): all the values (int64), concatenated, and where each blob's begin (len(blobs) + 1
    indexes; a blob without spans owns none). Each section is, per row, its member count then that many
    (start delta, length) pairs (see the module doc)."""
    sections: list[bytes | memoryview] = []
    for blob in blobs:
        size = read_header(blob).spans_bytes
        sections.append(memoryview(blob)[len(blob) - size + _SPANS_LENGTH.size :] if size else b"")
    data = np.frombuffer(b"".join(sections), dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    byte_starts = np.concatenate(([0], np.cumsum([len(s) for s in sections]))).astype(np.int64)
    return _varints(data, ends), np.searchsorted(ends, byte_starts)


def _varints(data: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """Every unsigned LEB128 varint in `data` (uint8), decoded at once (int64) rather than byte by byte in
    Python: evidence decodes the spans of every hit a reply carries (see bench/late_overhead.py). `ends`:
    where each varint ends (the bytes below 0x80), if known."""
    if ends is None:
        ends = np.flatnonzero(data < 0x80)
    values = data[ends].astype(np.int64)  # right for one-byte varints, most of them
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    multi = np.flatnonzero(ends > starts)
    if len(multi):
        first, lengths = starts[multi], ends[multi] - starts[multi] + 1
        longer = data[first].astype(np.int64) & 0x7F
        for k in range(1, int(lengths.max())):
            more = lengths > k
            longer[more] |= (data[first[more] + k].astype(np.int64) & 0x7F) << (7 * k)
        values[multi] = longer
    return values


@dataclass(frozen=True)
class TokenBlobInfo:
    fmt: str
    n_tokens: int
    dims: int
    unit_norm: bool
    pool_factor: int = 1  # version 2 and 3 blobs; 1 for version 1
    projection_seed: int | None = None  # None = not projected
    spans_bytes: int = 0  # version 3: size of the spans section (its length prefix included)


def read_header(blob: bytes | bytearray | memoryview) -> TokenBlobInfo:
    """Parses and checks a blob's header, including that the blob has exactly the payload it declares."""
    if len(blob) < HEADER_BYTES:
        raise ValueError(f"token blob truncated: {len(blob)} bytes, a header alone is {HEADER_BYTES}")
    magic, version, fmt_code, flags, n, dims, reserved = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ValueError(f"not a token blob: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"token blob version {version} is not supported (this code reads {_READABLE_VERSIONS})"
        )
    if fmt_code not in _FORMAT_NAMES:
        raise ValueError(f"token blob has unknown format code {fmt_code}")
    pool_factor, projection_seed = 1, None
    if version == CODEC_VERSION:
        if flags & ~_KNOWN_FLAGS or reserved != 0:
            raise ValueError(f"token blob header is corrupt: flags {flags:#x}, reserved {reserved}")
    else:
        pool_factor, seed = reserved & 0xFF, reserved >> 8
        projected = bool(flags & FLAG_PROJECTED)
        if flags & ~_KNOWN_FLAGS_V2 or pool_factor == 0 or (seed and not projected):
            raise ValueError(f"token blob header is corrupt: flags {flags:#x}, shape bytes {reserved:#06x}")
        projection_seed = seed if projected else None
    if dims == 0:
        raise ValueError("token blob header is corrupt: dims is 0")
    fmt = _FORMAT_NAMES[fmt_code]
    expected = HEADER_BYTES + n * bytes_per_token(fmt, dims)
    spans_bytes = 0
    if version == CODEC_VERSION_SPANS:
        if len(blob) < expected + _SPANS_LENGTH.size:
            raise ValueError(f"token blob truncated: {len(blob)} bytes, rows and a spans length need more")
        (body,) = _SPANS_LENGTH.unpack_from(blob, expected)
        spans_bytes = _SPANS_LENGTH.size + body
        expected += spans_bytes
    if len(blob) != expected:
        raise ValueError(
            f"token blob {'truncated' if len(blob) < expected else 'has trailing bytes'}: {len(blob)} bytes, "
            f"header says {n} x {dims} {fmt} = {expected} bytes"
        )
    return TokenBlobInfo(
        fmt, n, dims, bool(flags & FLAG_UNIT_NORM), pool_factor, projection_seed, spans_bytes
    )


def decode_into(blob: bytes | bytearray | memoryview, info: TokenBlobInfo, out: np.ndarray) -> None:
    """Decodes a checked blob's rows into `out` (n_tokens, dims) float32, e.g. a slice of a larger matrix."""
    n, dims = info.n_tokens, info.dims
    if n == 0:
        return
    if info.fmt == "fp16":
        out[...] = np.frombuffer(blob, dtype="<f2", count=n * dims, offset=HEADER_BYTES).reshape(n, dims)
        return
    codes, scales = int_codes(blob, info)
    out[...] = codes  # cast, then scale in place: measured faster than one mixed-type multiply
    out *= scales[:, None]


def decode_tokens(blob: bytes | bytearray | memoryview) -> np.ndarray:
    """A blob from `encode_tokens` -> float32 (n_tokens, dims). Raises ValueError on a bad blob."""
    info = read_header(blob)
    out = np.empty((info.n_tokens, info.dims), dtype=np.float32)
    decode_into(blob, info, out)
    return out
