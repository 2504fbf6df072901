"""Request validation: every rule and limit in one place, raising InvalidArgument with a precise message.

Validation runs before anything is written, so a rejected batch leaves nothing behind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from server.storage.fulltext import DEFAULT_LANGUAGE, LANGUAGES
from sieve_core.config import Settings
from sieve_core.errors import InvalidArgument
from sieve_core.types import METRICS, Condition, Document, SearchQuery, SearchSettings

# Matched with fullmatch: `$` would also accept a trailing newline ("name\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_JOB_ID = re.compile(r"[0-9a-f]{16}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux


def shown(value: str, limit: int = 80) -> str:
    """A client's value as an error message quotes it: repr (a NUL or a bidi control cannot hide in it), cut
    to `limit` characters (the message travels in a gRPC trailer, which clients cap at 8-16 KB)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _check_text(what: str, value: str) -> None:
    # Lone surrogates cannot be encoded as UTF-8 and NUL breaks tokenizers' C strings: refuse both.
    if "\x00" in value:
        raise InvalidArgument(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8") from None


def collection_name(name: str) -> str:
    if not name:
        raise InvalidArgument("collection name is empty")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid collection name {shown(name)}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def metric(value: str, settings: Settings) -> str:
    value = value or settings.default_metric
    if value not in METRICS:
        raise InvalidArgument(f"unknown metric {value!r}; expected one of {', '.join(METRICS)}")
    return value


def search_settings(s: SearchSettings, settings: Settings, where: str = "settings") -> SearchSettings:
    if (
        s.retrieve_candidates is not None
        and not 1 <= s.retrieve_candidates <= settings.max_retrieve_candidates
    ):
        raise InvalidArgument(
            f"{where}.retrieve_candidates must be between 1 and {settings.max_retrieve_candidates},"
            f" got {s.retrieve_candidates}"
        )
    if s.ef_search is not None and not 1 <= s.ef_search <= 4096:
        raise InvalidArgument(f"{where}.ef_search must be between 1 and 4096, got {s.ef_search}")
    for name in ("late_interaction_keep", "cross_encoder_keep"):
        value = getattr(s, name)
        if value is not None and not 1 <= value <= settings.max_retrieve_candidates:
            raise InvalidArgument(
                f"{where}.{name} must be between 1 and {settings.max_retrieve_candidates}, got {value}"
            )
    for name in ("late_interaction_model", "cross_encoder_model"):
        value = getattr(s, name)
        if value is not None:
            model_name(value, f"{where}.{name}")
    if s.latency_budget_ms is not None and not 1 <= s.latency_budget_ms <= 600_000:
        raise InvalidArgument(
            f"{where}.latency_budget_ms must be between 1 and 600000 (10 minutes), got {s.latency_budget_ms}"
        )
    if s.rrf_k is not None and not 1 <= s.rrf_k <= 100_000:
        raise InvalidArgument(f"{where}.rrf_k must be between 1 and 100000, got {s.rrf_k}")
    if s.dense_weight is not None and not (math.isfinite(s.dense_weight) and 0.0 <= s.dense_weight <= 1.0):
        raise InvalidArgument(f"{where}.dense_weight must be between 0 and 1, got {s.dense_weight}")
    return s


def text_language(value: str) -> str:
    """The full-text analyzer's language of a new collection ('' -> English)."""
    value = value or DEFAULT_LANGUAGE
    if value not in LANGUAGES:
        raise InvalidArgument(f"unknown text_language {shown(value)}; expected one of {', '.join(LANGUAGES)}")
    return value


def vector(values: Sequence[float] | np.ndarray, dims: int, where: str) -> np.ndarray:
    """A client's vector: the collection's dimensions, finite numbers."""
    out = np.asarray(values, dtype=np.float32)
    if out.shape != (dims,):
        raise InvalidArgument(f"{where} has {len(values)} dimensions; the collection's model has {dims}")
    if not np.isfinite(out).all():
        raise InvalidArgument(f"{where} contains a NaN or an infinity")
    return out


def embedding_model(given: str, name: str, model_id: str) -> None:
    """Vectors a client computed must come from the collection's model: its name or name@revision."""
    if not given:
        raise InvalidArgument(
            f"documents carry vectors but embedding_model is not set; set it to the model that made them"
            f" (this collection's is {name!r}, {model_id})"
        )
    if given not in (name, model_id):
        raise InvalidArgument(
            f"vectors of {shown(given)} cannot be stored in a collection of {name!r} ({model_id}): they would"
            " not be comparable with its queries' vectors"
        )


def search_inputs(query: SearchQuery, settings: SearchSettings) -> None:
    """What the effective settings need from the request: lexical retrieval and the re-rankers need text."""
    if query.query.strip():
        return
    needs = [
        name
        for name, wanted in (
            ("lexical retrieval", settings.retrieval.lexical),
            ("late interaction", settings.late_interaction.enabled),
            ("the cross-encoder", settings.cross_encoder.enabled),
        )
        if wanted
    ]
    if needs:
        raise InvalidArgument(f"query text is empty, and {' and '.join(needs)} need(s) it")


def model_name(value: str, where: str) -> str:
    """A bundle name: a folder directly in the models directory."""
    if not _MODEL_NAME.fullmatch(value):
        raise InvalidArgument(
            f"{where} must be a bundle name (letters, digits, '.', '_', '-'; at most 128), got {shown(value)}"
        )
    return value


def documents(docs: Sequence[Document], settings: Settings) -> None:
    if not docs:
        raise InvalidArgument("no documents in the request")
    if len(docs) > settings.max_batch_documents:
        raise InvalidArgument(
            f"batch of {len(docs)} documents is larger than the limit of {settings.max_batch_documents};"
            " split it, or use an index job for bulk loads"
        )
    seen: set[str] = set()
    for i, doc in enumerate(docs):
        where = f"documents[{i}]"
        document_id(doc.id, settings, where)
        if doc.id in seen:
            raise InvalidArgument(f"duplicate document id {doc.id!r} in the batch ({where})")
        seen.add(doc.id)
        document(doc, settings, where)


def document(doc: Document, settings: Settings, where: str) -> None:
    """One document's id, text and metadata; `where` names it in the message (e.g. "documents[3]", "line 7")."""
    document_id(doc.id, settings, where)
    if not doc.text.strip():
        raise InvalidArgument(f"{where} (id {doc.id!r}) has empty text")
    if len(doc.text) > settings.max_text_chars:
        raise InvalidArgument(
            f"{where} (id {doc.id!r}) text has {len(doc.text)} characters; the limit is {settings.max_text_chars}"
        )
    _check_text(f"{where}.text", doc.text)
    if len(doc.metadata) > settings.max_metadata_entries:
        raise InvalidArgument(
            f"{where} has {len(doc.metadata)} metadata entries; the limit is {settings.max_metadata_entries}"
        )
    for key, value in doc.metadata.items():
        if not key or len(key) > settings.max_metadata_key_chars:
            raise InvalidArgument(
                f"{where} metadata key {shown(key, 40)} must have 1-{settings.max_metadata_key_chars} characters"
            )
        if len(value) > settings.max_metadata_value_chars:
            raise InvalidArgument(
                f"{where} metadata value for {key!r} has {len(value)} characters;"
                f" the limit is {settings.max_metadata_value_chars}"
            )
        _check_text(f"{where}.metadata key", key)
        _check_text(f"{where}.metadata[{key!r}]", value)


def document_id(doc_id: str, settings: Settings, where: str = "id") -> None:
    if not doc_id:
        raise InvalidArgument(f"{where} has an empty id")
    if len(doc_id) > settings.max_id_chars:
        raise InvalidArgument(
            f"{where} id has {len(doc_id)} characters; the limit is {settings.max_id_chars}"
        )
    _check_text(f"{where} id", doc_id)


def ids(values: Sequence[str], settings: Settings) -> None:
    if not values:
        raise InvalidArgument("no ids in the request")
    if len(values) > settings.max_get_ids:
        raise InvalidArgument(f"{len(values)} ids is more than the limit of {settings.max_get_ids}")
    for i, doc_id in enumerate(values):
        document_id(doc_id, settings, f"ids[{i}]")


def conditions(conds: Sequence[Condition], settings: Settings) -> None:
    if len(conds) > settings.max_filter_conditions:
        raise InvalidArgument(
            f"filter has {len(conds)} conditions; the limit is {settings.max_filter_conditions}"
        )
    for i, cond in enumerate(conds):
        if not cond.key:
            raise InvalidArgument(f"filter.all[{i}] has an empty key")
        if len(cond.key) > settings.max_metadata_key_chars:
            raise InvalidArgument(
                f"filter.all[{i}] key is longer than {settings.max_metadata_key_chars} characters"
            )
        _check_text(f"filter.all[{i}].key", cond.key)
        _check_text(f"filter.all[{i}].equals", cond.equals)


def search(query: SearchQuery, settings: Settings) -> int:
    """Validate a search request, all of it (Engine.search calls this once); returns the effective top_k."""
    collection_name(query.collection)
    if not query.query.strip() and not query.query_vector:
        raise InvalidArgument("query is empty (give the query text, or a query_vector)")
    if len(query.query) > settings.max_query_chars:
        raise InvalidArgument(
            f"query has {len(query.query)} characters; the limit is {settings.max_query_chars}"
        )
    _check_text("query", query.query)
    top_k = query.top_k or settings.default_top_k
    if not 1 <= top_k <= settings.max_top_k:
        raise InvalidArgument(f"top_k must be between 1 and {settings.max_top_k}, got {query.top_k}")
    conditions(query.filter, settings)
    search_settings(query.settings, settings)
    min_generation(query.min_generation)
    return top_k


def min_generation(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"min_generation must be 0 or more, got {value}")
    return value


def job_id(value: str) -> str:
    if not value:
        raise InvalidArgument("job id is empty")
    if not _JOB_ID.fullmatch(value):
        raise InvalidArgument(f"invalid job id {shown(value)}")
    return value


def job_path(path: str) -> str:
    """The path of a job's source as the client wrote it (the file system has the last word on the rest)."""
    if not path:
        raise InvalidArgument("path is empty: give the absolute path of a JSONL file on the server")
    _check_text("path", path)
    size = len(path.encode("utf-8"))
    if size > MAX_PATH_BYTES:
        raise InvalidArgument(f"path has {size} bytes; the limit is {MAX_PATH_BYTES}")
    return path


def job_batch_size(value: int, settings: Settings) -> int:
    """0 means the server default; never more than a write batch may hold."""
    limit = min(settings.max_batch_documents, 1000)
    if value < 0 or value > limit:
        raise InvalidArgument(
            f"batch_size must be between 1 and {limit} (0: the server default), got {value}"
        )
    return min(value or settings.job_batch_size, limit)
