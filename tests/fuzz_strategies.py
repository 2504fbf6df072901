"""hypothesis strategies for every request of every sieve.v1 RPC, built field by field from the descriptors.

A strategy yields a request's wire bytes, not a message object: a string field can then carry what a
protobuf `str` cannot (lone surrogates, overlong or truncated UTF-8), and a message can carry unknown
fields, repeated singular fields and wrong wire types. Values are biased towards valid ones (real
collection names, document ids and job ids from `Pools`) so that validation deeper than the first check
runs too; odd values (NUL, RTL and zero-width marks, combining marks, very long strings, extreme numbers,
enum values outside the enum, long and empty repeated fields, odd map keys) are mixed in per field. A
`hostile` request may also break the encoding (invalid UTF-8, unknown or mistyped fields, bad varints).

Nothing here knows the server's limits beyond the boundary values it tries (256, 4096, 65536, 1000 ...).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st
from sieve.v1 import collections_pb2, documents_pb2, jobs_pb2, search_pb2

Strategy = st.SearchStrategy

# -- the wire format -----------------------------------------------------------------------------------
WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_START_GROUP, WIRE_END_GROUP, WIRE_FIXED32 = 0, 1, 2, 3, 4, 5
MAX_FIELD_NUMBER = (1 << 29) - 1


def varint(value: int) -> bytes:
    """Base-128 varint; a negative number as ten bytes of two's complement, as protobuf writes int32/int64."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, WIRE_LEN) + varint(len(payload)) + payload


def zigzag(value: int, bits: int) -> int:
    return ((value << 1) ^ (value >> (bits - 1))) & ((1 << bits) - 1)


# -- values ---------------------------------------------------------------------------------------------
# Odd but valid Unicode: NUL, bidi controls, zero-width characters, combining marks (alone, stacked and
# after a base), BOM, non-BMP characters, noncharacters, Unicode whitespace, format strings, path tricks.
ODD_TEXTS = (
    "\x00",
    "a\x00b",
    "\u200f",
    "abc\u202edef",
    "\u061c\u200e\u2067x\u2069",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\u0301",
    "e\u0301",
    "a" + "\u0301" * 300,
    "\U0001f469\u200d\U0001f4bb",
    "\U0010ffff",
    "\uffff\ufffe",
    "\ufffd",
    "\u3000\u00a0\u2028\u2029",
    " \t\r\n",
    "\U0001d518\U0001d52b\U0001d526",
    "\u05e2\u05d1\u05e8\u05d9\u05ea",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "%s%n%x{0}",
    "' OR 1=1; --",
    "../../../etc/passwd",
    "NaN",
    "-0",
    "\\x00\\ud800",
    "a/b",
    ".",
    "..",
    "-",
    "_",
    "\u0130\u0131",
    "\u1e9e\u00df",
)
# Byte strings that are not UTF-8: a lone surrogate (CESU-8), an overlong NUL, a truncated sequence,
# code points past U+10FFFF, a stray continuation byte, 0xFF.
INVALID_UTF8 = (
    b"\xed\xa0\x80",
    b"a\xed\xb0\x80b",
    b"\xc0\x80",
    b"\xe2\x82",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xff\xfe",
    b"ok\xc3",
)
LONG_UNITS = ("x", "\u00e9", "\u0301", "\U0001f600", " ", "\x00", "a ")
LONG_SIZES = (63, 64, 65, 127, 128, 129, 255, 256, 257, 2048, 2049, 4096, 4097, 65536, 65537, 300_000)


# What a real name or id may come with by mistake (or on purpose): a newline, bidi and zero-width marks,
# a combining mark that changes the last letter, a BOM, spaces, a NUL.
AFFIXES = ("\n", "\r\n", " ", "\t", "\u200f", "\u202e", "\u200b", "\ufeff", "\u0301", "\x00", "\u00a0")


def _around(value: bytes, affix: str, before: bool) -> bytes:
    return affix.encode() + value if before else value + affix.encode()


def odd_texts() -> Strategy[str]:
    return st.one_of(
        st.sampled_from(ODD_TEXTS),
        st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
        st.builds(lambda unit, n: unit * n, st.sampled_from(LONG_UNITS), st.sampled_from(LONG_SIZES)),
        st.builds(lambda a, b: a + b, st.sampled_from(ODD_TEXTS), st.text(max_size=8)),
    )


def invalid_utf8() -> Strategy[bytes]:
    return st.one_of(
        st.sampled_from(INVALID_UTF8),
        st.builds(lambda a, b: a + b, st.sampled_from(INVALID_UTF8), st.binary(max_size=8)),
        st.binary(min_size=1, max_size=16),
    )


def int_bounds(kind: int) -> tuple[int, int]:
    t = FieldDescriptor
    if kind in (t.TYPE_INT32, t.TYPE_SINT32, t.TYPE_SFIXED32, t.TYPE_ENUM):
        return -(1 << 31), (1 << 31) - 1
    if kind in (t.TYPE_UINT32, t.TYPE_FIXED32):
        return 0, (1 << 32) - 1
    if kind in (t.TYPE_UINT64, t.TYPE_FIXED64):
        return 0, (1 << 64) - 1
    return -(1 << 63), (1 << 63) - 1


def extreme_ints(kind: int) -> Strategy[int]:
    lo, hi = int_bounds(kind)
    edges = (lo, lo + 1, -1, 0, 1, 2, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, hi - 1, hi)
    return st.one_of(
        st.sampled_from(sorted({v for v in edges if lo <= v <= hi})), st.integers(0, 64), st.integers(lo, hi)
    )


FLOATS = (float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1.7976931348623157e308)


def floats() -> Strategy[float]:
    return st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True))


# -- hints: where a field's valid values come from -------------------------------------------------------
@dataclass(frozen=True)
class Pools:
    """Real names and ids on the server under test, so that generated requests reach real data."""

    read_collections: tuple[str, ...]  # searched and read, never written by the fuzzer
    write_collections: tuple[str, ...]  # scratch collections the fuzzer may write to, delete and recreate
    new_collections: tuple[str, ...]  # a bounded set of further names CreateCollection may create
    doc_ids: tuple[str, ...]
    job_ids: tuple[str, ...]
    paths: tuple[str, ...]  # files and directories for StartIndexJob, valid or not
    words: tuple[str, ...]
    metadata: dict[str, tuple[str, ...]]  # key -> values the seeded documents use
    models: tuple[str, ...] = ("all-MiniLM-L6-v2",)


@dataclass
class Hint:
    """A field's valid values (python values, or None: generic), how often it is set, and how often an
    odd value replaces a valid one (`odd` in [0, 1])."""

    values: Strategy[Any] | None = None
    presence: float = 0.5
    odd: float = 0.15
    max_items: int = 4  # for repeated fields: list length in the common case
    long_items: tuple[int, ...] = (64, 65, 1000, 1001)  # ...and replicated lengths in the rare case


@dataclass
class Hints:
    by_field: dict[tuple[str, str], Hint] = field(default_factory=dict)

    def get(self, message: Descriptor, name: str) -> Hint:
        return self.by_field.get((message.full_name, name), Hint())


def _words(pools: Pools, most: int = 8) -> Strategy[str]:
    return st.lists(st.sampled_from(pools.words), min_size=1, max_size=most).map(" ".join)


def hints_for(pools: Pools, writes: bool) -> Hints:
    """Hints for one RPC: `writes` RPCs name only scratch collections (the seeded ones must survive)."""
    if writes:
        collections = st.sampled_from(pools.write_collections + pools.new_collections)
    else:
        collections = st.sampled_from(pools.read_collections + pools.write_collections)
    doc_ids = st.sampled_from(pools.doc_ids)
    job_ids = st.one_of(st.sampled_from(pools.job_ids), st.just("0123456789abcdef"))
    keys = st.sampled_from(sorted(pools.metadata))
    values = st.sampled_from(sorted({v for vs in pools.metadata.values() for v in vs}))
    models = st.sampled_from(pools.models + ("no-such-model",))
    small = st.integers(1, 50)
    modes = st.integers(0, 3)
    p = {
        # collections
        ("sieve.v1.CreateCollectionRequest", "collection"): Hint(presence=0.95, odd=0.0),
        ("sieve.v1.Collection", "name"): Hint(collections, presence=0.95),
        ("sieve.v1.Collection", "embedding_model"): Hint(models, presence=0.2),
        ("sieve.v1.Collection", "embedding_model_id"): Hint(presence=0.05),
        ("sieve.v1.Collection", "metric"): Hint(st.integers(0, 3), presence=0.4),
        ("sieve.v1.Collection", "dimensions"): Hint(presence=0.05),
        ("sieve.v1.Collection", "defaults"): Hint(presence=0.4, odd=0.0),
        ("sieve.v1.Collection", "document_count"): Hint(presence=0.05),
        ("sieve.v1.Collection", "generation"): Hint(presence=0.05),
        ("sieve.v1.Collection", "created_at"): Hint(presence=0.05, odd=0.0),
        ("sieve.v1.Collection", "token_storage"): Hint(presence=0.3, odd=0.0),
        ("sieve.v1.TokenStorage", "pool_factor"): Hint(st.integers(-1, 20), presence=0.6),
        ("sieve.v1.TokenStorage", "projection_dims"): Hint(st.integers(-1, 500), presence=0.3),
        ("sieve.v1.TokenStorage", "description"): Hint(presence=0.05),
        ("sieve.v1.TokenStorage", "model_id"): Hint(presence=0.05),
        ("sieve.v1.TokenStorage", "pending"): Hint(presence=0.05),
        ("sieve.v1.Collection", "text_language"): Hint(
            st.sampled_from(("english", "dutch", "german", "french", "spanish", "klingon")), presence=0.3
        ),
        ("sieve.v1.GetCollectionRequest", "name"): Hint(collections, presence=0.95),
        ("sieve.v1.DeleteCollectionRequest", "name"): Hint(collections, presence=0.95),
        # documents
        ("sieve.v1.UpsertDocumentsRequest", "collection"): Hint(collections, presence=0.95),
        ("sieve.v1.UpsertDocumentsRequest", "documents"): Hint(presence=0.95, odd=0.0, max_items=6),
        ("sieve.v1.UpsertDocumentsRequest", "embedding_model"): Hint(models, presence=0.1),
        ("sieve.v1.Document", "vector"): Hint(presence=0.05, max_items=4, long_items=(383, 384, 385)),
        ("sieve.v1.Document", "id"): Hint(doc_ids, presence=0.95, odd=0.1),
        ("sieve.v1.Document", "text"): Hint(_words(pools, 30), presence=0.95, odd=0.1),
        ("sieve.v1.Document", "metadata"): Hint(presence=0.5, odd=0.0, max_items=3, long_items=(64, 65)),
        ("sieve.v1.Document.MetadataEntry", "key"): Hint(keys, presence=0.97, odd=0.1),
        ("sieve.v1.Document.MetadataEntry", "value"): Hint(values, presence=0.97, odd=0.1),
        ("sieve.v1.GetDocumentsRequest", "collection"): Hint(collections, presence=0.95),
        ("sieve.v1.GetDocumentsRequest", "ids"): Hint(doc_ids, presence=0.95, odd=0.08, max_items=8),
        ("sieve.v1.DeleteDocumentsRequest", "collection"): Hint(collections, presence=0.95),
        ("sieve.v1.DeleteDocumentsRequest", "ids"): Hint(doc_ids, presence=0.95, odd=0.08, max_items=6),
        # search
        ("sieve.v1.SearchRequest", "collection"): Hint(collections, presence=0.97),
        ("sieve.v1.SearchRequest", "query"): Hint(_words(pools), presence=0.97, odd=0.15),
        ("sieve.v1.SearchRequest", "top_k"): Hint(st.integers(0, 20), presence=0.6),
        ("sieve.v1.SearchRequest", "filter"): Hint(presence=0.3, odd=0.0),
        ("sieve.v1.SearchRequest", "settings"): Hint(presence=0.4, odd=0.0),
        ("sieve.v1.SearchRequest", "omit_documents"): Hint(st.booleans(), presence=0.3),
        ("sieve.v1.SearchRequest", "min_generation"): Hint(st.integers(0, 5), presence=0.15, odd=0.1),
        ("sieve.v1.SearchRequest", "query_vector"): Hint(
            presence=0.05, max_items=4, long_items=(383, 384, 385)
        ),
        ("sieve.v1.Filter", "all"): Hint(presence=0.9, odd=0.0, max_items=3, long_items=(16, 17, 1000)),
        ("sieve.v1.Condition", "key"): Hint(keys, presence=0.95, odd=0.1),
        ("sieve.v1.Condition", "equals"): Hint(values, presence=0.9, odd=0.1),
        ("sieve.v1.SearchSettings", "retrieve_candidates"): Hint(st.integers(1, 60), presence=0.3),
        ("sieve.v1.SearchSettings", "ef_search"): Hint(st.integers(1, 300), presence=0.2),
        ("sieve.v1.SearchSettings", "late_interaction"): Hint(modes, presence=0.5, odd=0.05),
        ("sieve.v1.SearchSettings", "late_interaction_keep"): Hint(small, presence=0.2),
        ("sieve.v1.SearchSettings", "cross_encoder"): Hint(modes, presence=0.3, odd=0.05),
        ("sieve.v1.SearchSettings", "cross_encoder_keep"): Hint(small, presence=0.2),
        ("sieve.v1.SearchSettings", "late_interaction_model"): Hint(models, presence=0.15),
        ("sieve.v1.SearchSettings", "cross_encoder_model"): Hint(models, presence=0.1),
        ("sieve.v1.SearchSettings", "retrieval"): Hint(st.integers(0, 3), presence=0.4, odd=0.05),
        ("sieve.v1.SearchSettings", "fusion"): Hint(st.integers(0, 2), presence=0.3, odd=0.05),
        ("sieve.v1.SearchSettings", "rrf_k"): Hint(st.integers(1, 200), presence=0.2),
        ("sieve.v1.SearchSettings", "dense_weight"): Hint(st.floats(0.0, 1.0), presence=0.2),
        # jobs
        ("sieve.v1.StartIndexJobRequest", "collection"): Hint(collections, presence=0.95),
        ("sieve.v1.StartIndexJobRequest", "path"): Hint(st.sampled_from(pools.paths), presence=0.95),
        ("sieve.v1.StartIndexJobRequest", "format"): Hint(st.integers(0, 2), presence=0.5),
        ("sieve.v1.StartIndexJobRequest", "batch_size"): Hint(st.integers(0, 16), presence=0.4),
        ("sieve.v1.UploadIndexJobRequest", "collection"): Hint(collections, presence=0.9),
        ("sieve.v1.UploadIndexJobRequest", "batch_size"): Hint(st.integers(0, 16), presence=0.3),
        ("sieve.v1.UploadIndexJobRequest", "documents"): Hint(presence=0.6, odd=0.0, max_items=4),
        ("sieve.v1.UploadIndexJobRequest", "jsonl"): Hint(jsonl(pools), presence=0.4, odd=0.2),
        ("sieve.v1.UploadIndexJobRequest", "format"): Hint(st.integers(0, 2), presence=0.4),
        ("sieve.v1.GetJobRequest", "id"): Hint(job_ids, presence=0.95),
        ("sieve.v1.GetJobRequest", "max_errors"): Hint(st.integers(0, 20), presence=0.4),
        ("sieve.v1.GetJobRequest", "errors_after_line"): Hint(st.integers(0, 20), presence=0.3),
        ("sieve.v1.WatchJobRequest", "id"): Hint(job_ids, presence=0.95),
        ("sieve.v1.WatchJobRequest", "min_interval_ms"): Hint(st.integers(0, 200), presence=0.5),
        ("sieve.v1.CancelJobRequest", "id"): Hint(job_ids, presence=0.95),
        ("sieve.v1.ListJobsRequest", "collection"): Hint(collections, presence=0.4),
        ("sieve.v1.ListJobsRequest", "limit"): Hint(st.integers(0, 20), presence=0.4),
    }
    return Hints(p)


def jsonl(pools: Pools) -> Strategy[bytes]:
    """Raw JSONL for uploads: Sieve and BEIR lines, blank lines, broken JSON, wrong types, odd text."""
    sieve_line = st.builds(
        lambda i, t: f'{{"id": "{i}", "text": "{t}"}}', st.sampled_from(pools.doc_ids), _words(pools, 6)
    )
    beir_line = st.builds(
        lambda i, t: f'{{"_id": "{i}", "title": "t", "text": "{t}"}}',
        st.sampled_from(pools.doc_ids),
        _words(pools, 6),
    )
    odd_line = st.sampled_from(
        (
            "",
            "   ",
            "{",
            "[]",
            "null",
            '{"id": 5, "text": "x"}',
            '{"id": "a", "text": ""}',
            '{"id": "a", "text": "x", "metadata": {"k": 1}}',
            '{"id": "a\\u0000", "text": "x"}',
            '{"id": "a", "text": "\\ud800"}',
            '{"_id": "b"}',
            '{"id": "' + "i" * 300 + '", "text": "x"}',
        )
    )
    line = st.one_of(sieve_line, sieve_line, beir_line, odd_line)
    return st.lists(line, min_size=1, max_size=5).map(lambda lines: ("\n".join(lines) + "\n").encode())


# -- messages --------------------------------------------------------------------------------------------
def _weighted(common: Strategy[Any], rare: Strategy[Any], rare_share: float) -> Strategy[Any]:
    """`rare` about `rare_share` of the time (st.one_of would not weight repeated branches). `common` comes
    first: hypothesis starts from, and shrinks towards, the first choice."""
    rare_slots = min(99, max(1, round(rare_share * 100)))
    if rare_share <= 0:
        return common
    if rare_share >= 1:
        return rare
    table = [False] * (100 - rare_slots) + [True] * rare_slots
    return st.sampled_from(table).flatmap(lambda pick_rare: rare if pick_rare else common)


def _choose(weighted: list[tuple[int, Strategy[Any]]]) -> Strategy[Any]:
    """One of the strategies, each with its weight."""
    table = [s for weight, s in weighted for _ in range(weight)]
    return st.sampled_from(range(len(table))).flatmap(lambda i: table[i])


class Builder:
    """Strategies for one RPC's request messages (wire bytes), from the descriptors and a `Hints`."""

    def __init__(self, hints: Hints, hostile: bool) -> None:
        self.hints = hints
        self.hostile = hostile
        self._memo: dict[str, Strategy[bytes]] = {}

    def message(self, desc: Descriptor) -> Strategy[bytes]:
        if desc.full_name not in self._memo:
            self._memo[desc.full_name] = st.deferred(lambda: self._message(desc))
        return self._memo[desc.full_name]

    def _message(self, desc: Descriptor) -> Strategy[bytes]:
        parts = [self._field(desc, f) for f in desc.fields]
        if self.hostile:
            parts.append(self._extras(desc))
        return st.tuples(*parts).map(b"".join)

    # A field: absent, or its encoding(s).
    def _field(self, desc: Descriptor, f: FieldDescriptor) -> Strategy[bytes]:
        hint = self.hints.get(desc, f.name)
        one = self._occurrence(f, hint)
        if f.is_repeated:
            common = st.lists(one, max_size=hint.max_items).map(b"".join)
            # Long lists repeat one element (cheap to generate); capped so a message stays under ~8 MB.
            long = st.builds(
                lambda item, n: item * max(1, min(n, 8_000_000 // max(1, len(item)))),
                one,
                st.sampled_from(hint.long_items),
            )
            value = _weighted(common, long, 0.04)
        else:
            value = one
            if self.hostile:  # a singular field sent twice: the last one wins
                value = _weighted(value, st.tuples(one, one).map(b"".join), 0.1)
        return _weighted(value, st.just(b""), 1 - hint.presence)

    def _occurrence(self, f: FieldDescriptor, hint: Hint) -> Strategy[bytes]:
        t = FieldDescriptor
        number = f.number
        if f.type == t.TYPE_MESSAGE:
            return self.message(f.message_type).map(lambda payload: length_delimited(number, payload))
        if f.type in (t.TYPE_STRING, t.TYPE_BYTES):
            valid = (
                hint.values.map(lambda v: v if isinstance(v, bytes) else v.encode())
                if hint.values is not None
                else st.text(max_size=12).map(str.encode)
            )
            odd: Strategy[bytes] = odd_texts().map(lambda s: s.encode("utf-8"))
            if hint.values is not None:  # a real value with something around it: "fz-seed\n", "d1\u0301"
                odd = st.one_of(odd, st.builds(_around, valid, st.sampled_from(AFFIXES), st.booleans()))
            if f.type == t.TYPE_BYTES or self.hostile:
                odd = st.one_of(odd, invalid_utf8())
            return _weighted(valid, odd, hint.odd if hint.values is not None else 0.5).map(
                lambda payload: length_delimited(number, payload)
            )
        if f.type == t.TYPE_BOOL:
            valid_bool = hint.values if hint.values is not None else st.booleans()
            return _weighted(valid_bool.map(int), st.sampled_from([2, 255, (1 << 64) - 1]), 0.1).map(
                lambda v: tag(number, WIRE_VARINT) + varint(v)
            )
        if f.type in (t.TYPE_DOUBLE, t.TYPE_FLOAT):
            fmt, wire = ("<d", WIRE_FIXED64) if f.type == t.TYPE_DOUBLE else ("<f", WIRE_FIXED32)
            return floats().map(lambda v: tag(number, wire) + _pack_float(fmt, v))
        # Integers and enums (an enum value outside the enum is just another int32).
        valid_int = hint.values if hint.values is not None else st.integers(0, 3)
        value = _weighted(valid_int, extreme_ints(f.type), hint.odd if hint.values is not None else 0.5)
        return value.map(_int_encoder(f))

    def _extras(self, desc: Descriptor) -> Strategy[bytes]:
        """Unknown fields, known fields with the wrong wire type, groups; mostly nothing."""
        known = [f.number for f in desc.fields] or [1]
        unknown_number = st.one_of(st.integers(len(known) + 1, 99), st.just(MAX_FIELD_NUMBER))
        number = st.one_of(unknown_number, st.sampled_from(known))
        item = st.one_of(
            st.builds(lambda n, v: tag(n, WIRE_VARINT) + varint(v), number, st.integers(0, (1 << 64) - 1)),
            st.builds(lambda n, v: tag(n, WIRE_FIXED64) + struct.pack("<d", v), number, floats()),
            st.builds(
                lambda n, v: tag(n, WIRE_FIXED32) + struct.pack("<I", v), number, st.integers(0, 2**32 - 1)
            ),
            st.builds(length_delimited, number, st.binary(max_size=32)),
            st.builds(
                lambda n, depth: tag(n, WIRE_START_GROUP) * depth + tag(n, WIRE_END_GROUP) * depth,
                unknown_number,
                st.integers(1, 8),
            ),
        )
        return _weighted(st.just(b""), st.lists(item, min_size=1, max_size=3).map(b"".join), 0.3)


def _pack_float(fmt: str, value: float) -> bytes:
    try:
        return struct.pack(fmt, value)
    except OverflowError:  # a double too large for a float
        return struct.pack(fmt, float("inf"))


def _int_encoder(f: FieldDescriptor) -> Callable[[int], bytes]:
    t = FieldDescriptor
    number = f.number
    if f.type in (t.TYPE_SINT32, t.TYPE_SINT64):
        bits = 32 if f.type == t.TYPE_SINT32 else 64
        return lambda v: tag(number, WIRE_VARINT) + varint(zigzag(v, bits))
    if f.type in (t.TYPE_FIXED32, t.TYPE_SFIXED32):
        return lambda v: tag(number, WIRE_FIXED32) + struct.pack("<I", v & 0xFFFFFFFF)
    if f.type in (t.TYPE_FIXED64, t.TYPE_SFIXED64):
        return lambda v: tag(number, WIRE_FIXED64) + struct.pack("<Q", v & (2**64 - 1))
    return lambda v: tag(number, WIRE_VARINT) + varint(v)


# -- calls -----------------------------------------------------------------------------------------------
SERVICE_MODULES = (collections_pb2, documents_pb2, search_pb2, jobs_pb2)
WRITES = {
    "CreateCollection",
    "DeleteCollection",
    "UpsertDocuments",
    "DeleteDocuments",
    "StartIndexJob",
    "UploadIndexJob",
    "CancelJob",
}
# Relative weight of each RPC in the mix (Search carries the most options, so it gets the most).
WEIGHTS = {
    "Search": 8,
    "SearchStream": 2,
    "UpsertDocuments": 3,
    "GetDocuments": 3,
    "DeleteDocuments": 2,
    "CreateCollection": 2,
    "GetCollection": 2,
    "ListCollections": 1,
    "DeleteCollection": 1,
    "StartIndexJob": 1,
    "UploadIndexJob": 2,
    "GetJob": 1,
    "WatchJob": 1,
    "CancelJob": 1,
    "ListJobs": 1,
}


@dataclass(frozen=True)
class Rpc:
    path: str  # "/sieve.v1.SearchService/Search"
    name: str
    input: Descriptor
    client_streaming: bool
    server_streaming: bool


def all_rpcs() -> list[Rpc]:
    out = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                path = f"/{service.full_name}/{m.name}"
                out.append(Rpc(path, m.name, m.input_type, m.client_streaming, m.server_streaming))
    return out


@dataclass(frozen=True)
class Call:
    rpc: Rpc
    messages: tuple[bytes, ...]  # one, or several for a client-streaming RPC
    kind: str  # "generated", "hostile" or "raw"

    def __repr__(self) -> str:
        return f"Call({self.rpc.name}, {self.kind}, {describe(self.rpc, self.messages)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """What hypothesis prints for a failing example (it would otherwise list the dataclass's fields,
        megabytes of them for a long message)."""
        printer.text(repr(self))


def describe(rpc: Rpc, messages: tuple[bytes, ...], limit: int = 600) -> str:
    """The messages as text when they parse, else their bytes (shortened)."""
    from google.protobuf import message_factory, text_format

    cls = message_factory.GetMessageClass(rpc.input)
    shown = []
    for raw in messages:
        try:
            text = text_format.MessageToString(cls.FromString(raw), as_one_line=True, as_utf8=True)
        except Exception:
            text = f"<{len(raw)} bytes, unparseable> {raw[:120]!r}"
        shown.append(text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)")
    return " | ".join(shown)


def call_strategy(rpc: Rpc, pools: Pools) -> Strategy[Call]:
    hints = hints_for(pools, rpc.name in WRITES)
    count = st.integers(1, 3) if rpc.client_streaming else st.just(1)

    def calls(builder: Builder, kind: str) -> Strategy[Call]:
        one = builder.message(rpc.input)
        return count.flatmap(lambda n: st.lists(one, min_size=n, max_size=n)).map(
            lambda msgs: Call(rpc, tuple(msgs), kind)
        )

    generated = calls(Builder(hints, hostile=False), "generated")
    hostile = calls(Builder(hints, hostile=True), "hostile")
    raw = st.one_of(
        st.binary(max_size=64),  # random bytes
        Builder(hints, hostile=False)
        .message(rpc.input)
        .flatmap(  # a valid message cut short
            lambda payload: st.integers(0, max(0, len(payload) - 1)).map(lambda n: payload[:n])
        ),
    ).map(lambda payload: Call(rpc, (payload,), "raw"))
    return _choose([(8, generated), (1, hostile), (1, raw)])


def mix(pools: Pools) -> Strategy[Call]:
    """One call of any RPC, in the proportions of WEIGHTS."""
    # Heaviest first: hypothesis favours the first choice a little (it is where shrinking goes).
    rpcs = sorted(all_rpcs(), key=lambda rpc: -WEIGHTS[rpc.name])
    return _choose([(WEIGHTS[rpc.name], call_strategy(rpc, pools)) for rpc in rpcs])


# -- a fixed corpus of raw payloads ----------------------------------------------------------------------
def valid_request(rpc: Rpc, pools: Pools) -> bytes:
    """A well-formed request of this RPC that reads real data (or, for writes, names no real collection)."""
    collection = pools.read_collections[0]
    missing = "fz-no-such-collection"
    doc = documents_pb2.Document(id=pools.doc_ids[0], text="some text", metadata={"kind": "even"})
    messages = {
        "CreateCollection": collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(name=collection)
        ),
        "GetCollection": collections_pb2.GetCollectionRequest(name=collection),
        "ListCollections": collections_pb2.ListCollectionsRequest(),
        "DeleteCollection": collections_pb2.DeleteCollectionRequest(name=missing),
        "UpsertDocuments": documents_pb2.UpsertDocumentsRequest(collection=missing, documents=[doc]),
        "GetDocuments": documents_pb2.GetDocumentsRequest(collection=collection, ids=list(pools.doc_ids[:3])),
        "DeleteDocuments": documents_pb2.DeleteDocumentsRequest(collection=missing, ids=["a"]),
        "Search": search_pb2.SearchRequest(collection=collection, query="river coffee", top_k=3),
        "SearchStream": search_pb2.SearchRequest(collection=collection, query="river coffee", top_k=3),
        "StartIndexJob": jobs_pb2.StartIndexJobRequest(collection=missing, path=pools.paths[0]),
        "UploadIndexJob": jobs_pb2.UploadIndexJobRequest(collection=missing, documents=[doc]),
        "GetJob": jobs_pb2.GetJobRequest(id=pools.job_ids[0]),
        "WatchJob": jobs_pb2.WatchJobRequest(id=pools.job_ids[0]),
        "CancelJob": jobs_pb2.CancelJobRequest(id=pools.job_ids[0]),
        "ListJobs": jobs_pb2.ListJobsRequest(limit=5),
    }
    return messages[rpc.name].SerializeToString()


def _nested_groups(depth: int, number: int = 99) -> bytes:
    return tag(number, WIRE_START_GROUP) * depth + tag(number, WIRE_END_GROUP) * depth


def _nested_length_delimited(depth: int, number: int = 99) -> bytes:
    payload = b""
    for _ in range(depth):
        payload = length_delimited(number, payload)
    return payload


def _padded(base: bytes, total: int) -> bytes:
    """`base` plus an unknown bytes field (number 99) so that the message is exactly `total` bytes."""
    size = total - len(base) - len(tag(99, WIRE_LEN))
    for width in range(1, 11):  # the length prefix takes some of the room
        if len(varint(size - width)) == width:
            return base + length_delimited(99, b"\x00" * (size - width))
    raise ValueError(total)


def raw_corpus(
    rpc: Rpc, pools: Pools, max_message_bytes: int, rng: Any
) -> list[tuple[str, tuple[bytes, ...]]]:
    """(label, messages) pairs: undecodable, extreme or oversized payloads, for one RPC.

    For a client-streaming RPC each bad payload is sent alone and after a valid first message; `rng` is a
    random.Random (random bytes come from it, so the corpus is the same on every run)."""
    valid = valid_request(rpc, pools)
    bad: list[tuple[str, bytes]] = []
    for n in (1, 2, 3, 7, 64, 1000, 65_536):
        bad.append((f"{n} random bytes", rng.randbytes(n)))
    step = max(1, len(valid) // 12)
    for cut in range(1, len(valid), step):
        bad.append((f"valid message cut to {cut} of {len(valid)} bytes", valid[:cut]))
    for f in rpc.input.fields:
        for wire_type, payload in (
            (WIRE_VARINT, varint((1 << 64) - 1)),
            (WIRE_FIXED64, struct.pack("<d", float("nan"))),
            (WIRE_FIXED32, struct.pack("<f", float("-inf"))),
            (WIRE_LEN, varint(3) + b"\xed\xa0\x80"),
            (WIRE_START_GROUP, tag(f.number, WIRE_END_GROUP)),
        ):
            bad.append(
                (f"field {f.name} with wire type {wire_type}", valid + tag(f.number, wire_type) + payload)
            )
        if f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            for text in INVALID_UTF8:
                bad.append((f"field {f.name} = {text!r}", valid + length_delimited(f.number, text)))
        if f.is_repeated:
            element = length_delimited(f.number, b"")
            if f.type == FieldDescriptor.TYPE_STRING:
                element = length_delimited(f.number, pools.doc_ids[0].encode())
            bad.append((f"{f.name} repeated 200,000 times", valid + element * 200_000))
    bad += [
        ("field number 0", tag(0, WIRE_VARINT) + b"\x01"),
        ("field number 2^29", varint(1 << 32 | WIRE_VARINT) + b"\x01"),
        ("wire type 6", tag(1, 6) + b"\x01"),
        ("wire type 7", tag(1, 7)),
        ("an 11-byte varint", tag(99, WIRE_VARINT) + b"\xff" * 10 + b"\x01"),
        ("a length past the end", tag(99, WIRE_LEN) + varint(1000) + b"abc"),
        ("a length of 2^63", tag(99, WIRE_LEN) + varint(1 << 63) + b"abc"),
        ("an end group without a start", valid + tag(99, WIRE_END_GROUP)),
        ("a start group without an end", valid + tag(99, WIRE_START_GROUP)),
        ("mismatched group numbers", tag(98, WIRE_START_GROUP) + tag(97, WIRE_END_GROUP)),
    ]
    for depth in (50, 99, 100, 101, 1000, 100_000):
        bad.append((f"unknown groups nested {depth} deep", valid + _nested_groups(depth)))
    for depth in (100, 1000):
        bad.append((f"unknown fields nested {depth} deep", valid + _nested_length_delimited(depth)))
    bad.append(("just under the size limit", _padded(valid, max_message_bytes - 1024)))
    bad.append(("at the size limit", _padded(valid, max_message_bytes)))
    bad.append(("just over the size limit", _padded(valid, max_message_bytes + 1)))

    corpus = [(label, (payload,)) for label, payload in bad]
    if rpc.client_streaming:
        # Opened by a valid message naming a real collection, so that the server goes on to read the bad one.
        opening = jobs_pb2.UploadIndexJobRequest(collection=pools.write_collections[0]).SerializeToString()
        corpus += [(f"{label}, after a valid first message", (opening, payload)) for label, payload in bad]
    return corpus
