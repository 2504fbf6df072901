"""Typed arguments -> sieve.v1 request messages (shared by the sync and async clients)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypedDict

import grpc

from sieve.errors import InvalidArgument
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, jobs_pb2, search_pb2

StageModeArg: TypeAlias = Literal["off", "best_effort", "required"] | common_pb2.StageMode | int | None
MetricArg: TypeAlias = Literal["cosine", "ip", "l2"] | common_pb2.Metric | int | None
FormatArg: TypeAlias = Literal["auto", "sieve", "beir"] | jobs_pb2.SourceFormat | int
DocumentArg: TypeAlias = documents_pb2.Document | Mapping[str, Any]
FilterArg: TypeAlias = Mapping[str, str] | common_pb2.Filter | None
SettingsArg: TypeAlias = common_pb2.SearchSettings | Mapping[str, Any] | None
TierArg: TypeAlias = Literal["fast", "balanced", "best"] | common_pb2.SearchTier | int | None
RetrievalArg: TypeAlias = Literal["dense", "lexical", "hybrid"] | common_pb2.Retrieval | int | None
FusionArg: TypeAlias = Literal["rrf", "weighted"] | common_pb2.Fusion | int | None
# A vector: a list or tuple of numbers, or anything with .tolist() (a numpy array).
VectorArg: TypeAlias = Sequence[float] | Any
# A JSONL file (path), JSONL bytes in chunks, or documents.
UploadSource: TypeAlias = str | Path | Iterable[bytes] | Iterable[DocumentArg]

_STAGE_MODES = {
    "off": common_pb2.STAGE_MODE_OFF,
    "best_effort": common_pb2.STAGE_MODE_BEST_EFFORT,
    "best-effort": common_pb2.STAGE_MODE_BEST_EFFORT,
    "required": common_pb2.STAGE_MODE_REQUIRED,
}
_TIERS = {
    "fast": common_pb2.SEARCH_TIER_FAST,
    "balanced": common_pb2.SEARCH_TIER_BALANCED,
    "best": common_pb2.SEARCH_TIER_BEST,
}
_RETRIEVALS = {
    "dense": common_pb2.RETRIEVAL_DENSE,
    "lexical": common_pb2.RETRIEVAL_LEXICAL,
    "hybrid": common_pb2.RETRIEVAL_HYBRID,
}
_FUSIONS = {"rrf": common_pb2.FUSION_RRF, "weighted": common_pb2.FUSION_WEIGHTED}
_METRICS = {
    "cosine": common_pb2.METRIC_COSINE,
    "ip": common_pb2.METRIC_INNER_PRODUCT,
    "inner_product": common_pb2.METRIC_INNER_PRODUCT,
    "l2": common_pb2.METRIC_L2,
}
_FORMATS = {
    "auto": jobs_pb2.SOURCE_FORMAT_UNSPECIFIED,
    "sieve": jobs_pb2.SOURCE_FORMAT_SIEVE,
    "beir": jobs_pb2.SOURCE_FORMAT_BEIR,
}


def _lookup(table: Mapping[str, int], value: str | int, what: str) -> int:
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise ValueError(f"unknown {what} {value!r}; one of {sorted(table)}") from None
    return int(value)


def stage_mode(value: StageModeArg) -> int:
    return common_pb2.STAGE_MODE_UNSPECIFIED if value is None else _lookup(_STAGE_MODES, value, "stage mode")


def search_tier(value: TierArg) -> int:
    return common_pb2.SEARCH_TIER_UNSPECIFIED if value is None else _lookup(_TIERS, value, "search tier")


def source_format(value: FormatArg) -> int:
    return _lookup(_FORMATS, value, "source format")


def parse_document(value: DocumentArg) -> documents_pb2.Document:
    """A Document message from a message or a {"id", "text", "metadata"} mapping, checked as the server
    checks a JSONL line, with the same reasons in the same words (and as the TypeScript client's
    `toDocument`). Raises ValueError(reason)."""
    if isinstance(value, documents_pb2.Document):
        return value
    if not isinstance(value, Mapping):
        raise ValueError("not a JSON object")
    doc_id = value.get("id")
    if doc_id is None:
        raise ValueError('missing id ("id")')
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        raise ValueError('id ("id") must be a string or an integer')
    text = value.get("text")
    if text is None:
        raise ValueError('missing "text"')
    if not isinstance(text, str):
        raise ValueError('"text" must be a string')
    metadata = value.get("metadata") or {}
    if not isinstance(metadata, Mapping) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError('"metadata" must be an object with string values')
    return documents_pb2.Document(id=str(doc_id), text=text, metadata=dict(metadata))


def document(value: DocumentArg, index: int = 0) -> documents_pb2.Document:
    """`parse_document`, its refusal raised as `sieve.InvalidArgument` naming documents[index], before any
    call is made."""
    try:
        return parse_document(value)
    except ValueError as exc:
        message = f"documents[{index}]: {exc}"
        raise InvalidArgument(message, code=grpc.StatusCode.INVALID_ARGUMENT) from None


def search_settings(
    base: SettingsArg,
    *,
    retrieve_candidates: int | None = None,
    ef_search: int | None = None,
    late_interaction: StageModeArg = None,
    late_interaction_keep: int | None = None,
    cross_encoder: StageModeArg = None,
    cross_encoder_keep: int | None = None,
    latency_budget_ms: int | None = None,
    tier: TierArg = None,
    retrieval: RetrievalArg = None,
    fusion: FusionArg = None,
    rrf_k: int | None = None,
    dense_weight: float | None = None,
) -> common_pb2.SearchSettings:
    """`base` (a message or a dict of its fields), with the keyword arguments that are not None on top.
    `retrieval`: "dense", "lexical" (BM25) or "hybrid" (both, fused by `fusion`: "rrf" with `rrf_k`, or
    "weighted" with `dense_weight` in [0, 1])."""
    settings = common_pb2.SearchSettings()
    if isinstance(base, common_pb2.SearchSettings):
        settings.CopyFrom(base)
    elif base:
        base = dict(base)
        for key in ("late_interaction", "cross_encoder"):
            if key in base:
                base[key] = stage_mode(base[key])
        if "tier" in base:
            base["tier"] = search_tier(base["tier"])
        # Hybrid retrieval by name too: {"retrieval": "hybrid", "fusion": "rrf", "rrf_k": 60}.
        if "retrieval" in base:
            base["retrieval"] = _lookup(_RETRIEVALS, base["retrieval"], "retrieval")
        if "fusion" in base:
            base["fusion"] = _lookup(_FUSIONS, base["fusion"], "fusion")
        settings = common_pb2.SearchSettings(**base)
    for key, value in (
        ("retrieve_candidates", retrieve_candidates),
        ("ef_search", ef_search),
        ("late_interaction_keep", late_interaction_keep),
        ("cross_encoder_keep", cross_encoder_keep),
        ("latency_budget_ms", latency_budget_ms),
        ("rrf_k", rrf_k),
        ("dense_weight", dense_weight),
    ):
        if value is not None:
            setattr(settings, key, value)
    if retrieval is not None:
        settings.retrieval = _lookup(_RETRIEVALS, retrieval, "retrieval")  # type: ignore[assignment]
    if fusion is not None:
        settings.fusion = _lookup(_FUSIONS, fusion, "fusion")  # type: ignore[assignment]
    if late_interaction is not None:
        settings.late_interaction = stage_mode(late_interaction)  # type: ignore[assignment]
    if cross_encoder is not None:
        settings.cross_encoder = stage_mode(cross_encoder)  # type: ignore[assignment]
    if tier is not None:
        settings.tier = search_tier(tier)  # type: ignore[assignment]
    return settings


def create_collection(
    name: str,
    embedding_model: str,
    metric: MetricArg,
    defaults: SettingsArg,
    token_storage: Mapping[str, int | str] | None = None,
) -> collections_pb2.CreateCollectionRequest:
    return collections_pb2.CreateCollectionRequest(
        collection=collections_pb2.Collection(
            name=name,
            embedding_model=embedding_model,
            metric=common_pb2.METRIC_UNSPECIFIED if metric is None else _lookup(_METRICS, metric, "metric"),  # type: ignore[arg-type]
            defaults=search_settings(defaults),
            token_storage=None if token_storage is None else _token_storage(token_storage),
        )
    )


def upsert(
    collection: str, documents: Iterable[DocumentArg], embedding_model: str = ""
) -> documents_pb2.UpsertDocumentsRequest:
    """A dict may carry its own "vector" (computed by the client with the collection's model, which
    `embedding_model` must name); a Document message its `vector` field."""
    docs = []
    for i, d in enumerate(documents):
        message = document(d, i)
        if isinstance(d, Mapping) and d.get("vector") is not None:
            message.vector.extend(vector_values(d["vector"]))
        docs.append(message)
    return documents_pb2.UpsertDocumentsRequest(
        collection=collection, documents=docs, embedding_model=embedding_model
    )


def vector_values(value: VectorArg) -> list[float]:
    """A vector as the list of floats protobuf takes (a numpy array through its own .tolist(): fast)."""
    return value.tolist() if hasattr(value, "tolist") else [float(x) for x in value]


class SearchOptions(TypedDict, total=False):
    """The keyword arguments of `search` and `search_stream` besides `timeout` (see `SieveClient.search`)."""

    top_k: int
    filter: FilterArg
    settings: SettingsArg
    retrieve_candidates: int | None
    ef_search: int | None
    late_interaction: StageModeArg
    late_interaction_keep: int | None
    cross_encoder: StageModeArg
    cross_encoder_keep: int | None
    latency_budget_ms: int | None
    tier: TierArg
    retrieval: RetrievalArg
    fusion: FusionArg
    rrf_k: int | None
    dense_weight: float | None
    query_vector: VectorArg | None
    omit_documents: bool
    min_generation: int


_REQUEST_FIELDS = ("top_k", "omit_documents", "min_generation")


def search(collection: str, query: str, options: SearchOptions) -> search_pb2.SearchRequest:
    """The SearchRequest of `search(collection, query, **options)` (a TypeError for an unknown option, as
    Python gives for a misspelt keyword argument)."""
    unknown = sorted(set(options) - set(SearchOptions.__annotations__))
    if unknown:
        raise TypeError(f"search() got unexpected keyword arguments: {', '.join(unknown)}")
    given: dict[str, Any] = dict(options)
    flt = given.pop("filter", None)
    if flt is not None and not isinstance(flt, common_pb2.Filter):
        flt = common_pb2.Filter(all=[common_pb2.Condition(key=k, equals=v) for k, v in flt.items()])
    fields: dict[str, Any] = {key: given.pop(key) for key in _REQUEST_FIELDS if key in given}
    vector = given.pop("query_vector", None)
    if vector is not None:
        fields["query_vector"] = vector_values(vector)
    settings = search_settings(given.pop("settings", None), **given)
    return search_pb2.SearchRequest(
        collection=collection, query=query, filter=flt, settings=settings, **fields
    )


def upload_messages(
    collection: str,
    source: UploadSource,
    *,
    format: FormatArg,
    batch_size: int,
    chunk_bytes: int = 1 << 20,
    documents_per_message: int = 500,
) -> Iterator[jobs_pb2.UploadIndexJobRequest]:
    """The UploadIndexJob request stream: the raw bytes of a JSONL file (a path, or an iterable of byte
    chunks cut anywhere, e.g. to show progress), or documents in groups."""
    yield jobs_pb2.UploadIndexJobRequest(
        collection=collection,
        batch_size=batch_size,
        format=source_format(format),  # type: ignore[arg-type]
    )
    if isinstance(source, str | Path):
        with Path(source).open("rb") as fh:
            while chunk := fh.read(chunk_bytes):
                yield jobs_pb2.UploadIndexJobRequest(jsonl=chunk)
        return
    group: list[documents_pb2.Document] = []
    index = 0  # of the documents only, as the TypeScript client counts them
    for item in source:
        if isinstance(item, bytes | bytearray | memoryview):
            yield jobs_pb2.UploadIndexJobRequest(jsonl=bytes(item))
            continue
        group.append(document(item, index))
        index += 1
        if len(group) >= documents_per_message:
            yield jobs_pb2.UploadIndexJobRequest(documents=group)
            group = []
    if group:
        yield jobs_pb2.UploadIndexJobRequest(documents=group)


def _token_storage(spec: Mapping[str, int | str]) -> collections_pb2.TokenStorage:
    """{"pool_factor": 4, "projection_dims": 128, "codec": "int8"} -> TokenStorage (unknown keys: ValueError from protobuf)."""
    build: Any = collections_pb2.TokenStorage  # the stubs type every keyword as the message's own fields
    return build(**spec)
