"""The first stage of a search, and reads by id: the query's vector (cached), the index search (exact,
HNSW, or filtered), and the hits with their documents from the store."""

from __future__ import annotations

import time

import numpy as np

from server.core import validation
from server.core.collections import Collection, Collections
from server.core.executors import Executors
from server.core.tokens import QueryTokens
from server.storage.store import Store
from sieve_core.cache import ResultCache, query_tokens_key, query_vector_key
from sieve_core.config import Settings
from sieve_core.types import (
    Document,
    Hit,
    SearchQuery,
    SearchSettings,
    Stage,
    StageReport,
    StageScore,
    StageStatus,
)


class Retrieval:
    def __init__(
        self, settings: Settings, store: Store, collections: Collections, cache: ResultCache, run: Executors
    ) -> None:
        self._settings = settings
        self._store = store
        self._collections = collections
        self._cache = cache
        self._run = run

    async def get_documents(self, name: str, ids: list[str]) -> tuple[list[Document], list[str]]:
        col = self._collections.get(name)
        validation.ids(ids, self._settings)
        found = await self._run.read(self._store.get_documents, col.row.id, ids)
        docs = [Document(found[i].doc_id, found[i].text, found[i].metadata) for i in ids if i in found]
        return docs, [i for i in ids if i not in found]

    async def retrieve(
        self,
        col: Collection,
        query: SearchQuery,
        count: int,
        settings: SearchSettings,
        text_for: int,
        query_tokens: bool = False,
    ) -> tuple[list[Hit], StageReport, int, QueryTokens | None]:
        """The `count` nearest documents, the stage's report, the generation the index showed, and with
        `query_tokens` the query's token vectors from the same encoder pass as its vector (zero-shot late
        interaction needs no second query encoding). Only the first `text_for` hits come with their text
        and metadata (the others are `loaded` later, if a stage or the reply needs them: late interaction
        reads token vectors by key, so 100 candidates' texts need not be read for the 10 sent)."""
        return await self._run.read(self._retrieve, col, query, count, settings, text_for, query_tokens)

    async def load(self, collection_id: int, hits: list[Hit]) -> None:
        """Fills in the text and metadata of the hits that were retrieved without them."""
        missing = [h for h in hits if not h.loaded]
        if missing:
            await self._run.read(self._load, collection_id, missing)

    def _load(self, collection_id: int, hits: list[Hit]) -> None:
        docs = self._store.documents_by_keys(collection_id, [h.key for h in hits], with_text=True)
        for hit in hits:
            doc = docs.get(hit.key)
            if doc is not None:  # else replaced or deleted since the search began: it keeps no text
                hit.text, hit.metadata = doc.text, doc.metadata
            hit.loaded = True

    def _retrieve(
        self,
        col: Collection,
        query: SearchQuery,
        count: int,
        settings: SearchSettings,
        text_for: int,
        query_tokens: bool,
    ) -> tuple[list[Hit], StageReport, int, QueryTokens | None]:
        started = time.perf_counter()
        generation = col.visible_generation  # every write up to here is in the index
        tokens = None
        if query_tokens:
            vector, tokens = self._query_encoding(col, query.query)
        else:
            vector = self._query_vector(col, query.query)
        if query.filter:
            keys, scores, method, seen = self._filtered_search(col, vector, query, count, settings)
        elif len(col.index) <= self._settings.full_scan_max:
            keys, scores = col.index.search_all(vector, count)
            method, seen = "exact", len(col.index)
        else:
            keys, scores = col.index.search(vector, count, settings.ef_search)
            method, seen = "hnsw", len(col.index)
        hits = self._hits(col, keys, scores, text_for)
        report = StageReport(
            Stage.RETRIEVE,
            StageStatus.COMPLETED,
            candidates_in=seen,
            candidates_out=len(hits),
            took_ms=(time.perf_counter() - started) * 1000,
            model_id=col.runner.model_id,
            method=method,
        )
        return hits, report, generation, tokens

    def _hits(self, col: Collection, keys: np.ndarray, scores: np.ndarray, text_for: int) -> list[Hit]:
        found = keys.tolist()
        docs = self._store.documents_by_keys(col.row.id, found[:text_for], with_text=True) if text_for else {}
        loaded = set(docs)
        docs.update(self._store.documents_by_keys(col.row.id, found[text_for:], with_text=False))
        hits: list[Hit] = []
        for key, score in zip(keys.tolist(), scores.tolist(), strict=True):
            doc = docs.get(key)
            if doc is None:  # removed between the index search and the lookup
                continue
            hits.append(
                Hit(
                    doc.doc_id,
                    score,
                    doc.text,
                    doc.metadata,
                    [StageScore(Stage.RETRIEVE, score, len(hits))],
                    key=key,
                    loaded=key in loaded,
                )
            )
        return hits

    def _query_vector(self, col: Collection, text: str) -> np.ndarray:
        """The query's embedding, from the Redis cache when this model has embedded it before."""
        key = query_vector_key(col.runner.manifest.cache_id, text)
        vector = self._cache.get_vector(key, col.runner.dims)
        if vector is None:
            vector = col.runner.embed([text])[0]
            self._cache.put_vector(key, vector)
        return vector

    def _query_encoding(self, col: Collection, text: str) -> tuple[np.ndarray, QueryTokens]:
        """The query's vector and token vectors from ONE encoder pass, cached together in Redis (the
        vector is row 0 of the cached matrix)."""
        key = query_tokens_key(col.runner.manifest.cache_id, text)
        cached = self._cache.get_matrix(key, col.runner.dims)
        if cached is not None and len(cached) >= 2:
            return cached[0], QueryTokens(cached[1:], "cache")
        vectors, rows = col.runner.encode([text], tokens=True)
        assert rows is not None
        self._cache.put_matrix(key, np.vstack([vectors[:1], rows[0]]))
        return vectors[0], QueryTokens(rows[0], "encoder pass")

    def _filtered_search(
        self, col: Collection, vector: np.ndarray, query: SearchQuery, count: int, settings: SearchSettings
    ) -> tuple[np.ndarray, np.ndarray, str, int]:
        """True top-k among matching documents: exact when the filter is selective, else a widening HNSW walk."""
        allowed = self._store.filter_keys(col.row.id, query.filter)
        if len(allowed) <= self._settings.exact_filter_max:
            keys, scores = col.index.search_exact(vector, allowed, count)
            return keys, scores, "exact", len(allowed)
        total = max(len(col.index), 1)
        # Expect len(allowed)/total of the graph's neighbours to match; ask for twice what that needs.
        want = min(total, max(count * 2 * total // len(allowed), count))
        while True:
            keys, scores = col.index.search(vector, want, max(settings.ef_search or 0, want))
            keep = np.isin(keys, allowed)
            if keep.sum() >= count or want >= total:
                return keys[keep][:count], scores[keep][:count], "hnsw+filter", len(allowed)
            want = min(total, want * 2)
