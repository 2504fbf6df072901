"""The first stage of a search, and reads by id: the query's vector (cached, or the client's), the index
search (exact, HNSW, or filtered), BM25 and the fusion of both for lexical and hybrid retrieval
(server/core/hybrid.py), and the hits with their documents from the store."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from server.core import hybrid, validation
from server.core.collections import Collection, Collections
from server.core.executors import Executors
from server.core.fusion import Ranked
from server.core.tokens import QueryTokens
from server.storage.store import Store
from sieve_core.cache import ResultCache, query_tokens_key, query_vector_key
from sieve_core.config import Settings
from sieve_core.errors import FailedPrecondition
from sieve_core.types import (
    Document,
    Hit,
    RetrievalMode,
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
    ) -> tuple[list[Hit], list[StageReport], int, QueryTokens | None]:
        """The first stage: the `count` best documents by the dense index, BM25, or both fused (as
        settings.retrieval says), each part's report, the generation the indexes showed, and with
        `query_tokens` the query's token vectors from the same encoder pass as its vector (zero-shot late
        interaction needs no second query encoding; lexical retrieval runs that pass for them alone). Only
        the first `text_for` hits come with their text and metadata (the others are `loaded` later, if a
        stage or the reply needs them: late interaction reads token vectors by key, so 100 candidates'
        texts need not be read for the 10 sent)."""
        generation = col.visible_generation  # every write up to here is in the indexes
        mode = settings.retrieval if settings.retrieval != RetrievalMode.UNSPECIFIED else RetrievalMode.DENSE
        if mode == RetrievalMode.DENSE:
            hits, report, tokens = await self._run.read(
                self._dense_hits, col, query, count, settings, text_for, query_tokens
            )
            return hits, [report], generation, tokens
        fulltext = col.fulltext
        if fulltext is None:  # never for a loaded collection; a guard for the type checker
            raise FailedPrecondition(f"collection {col.row.name!r} has no full-text index")
        lexical = self._run.read(
            hybrid.lexical, self._store, col.row.id, fulltext, query.query, query.filter, count
        )
        if mode == RetrievalMode.LEXICAL:
            if query_tokens:
                (ranked, report), (_, tokens) = await asyncio.gather(
                    lexical, self._run.read(self._query_encoding, col, query.query)
                )
            else:
                (ranked, report), tokens = await lexical, None
            stage = [[StageScore(Stage.LEXICAL, s, i)] for i, s in enumerate(ranked.scores.tolist())]
            hits = await self._run.read(self._hits, col, ranked.keys, ranked.scores, text_for, stage)
            return hits, [report], generation, tokens
        # Hybrid: both sides at once (two executor threads), then the fusion.
        (dense, dense_report, tokens), (lex, lex_report) = await asyncio.gather(
            self._run.read(self._dense, col, query, count, settings, query_tokens), lexical
        )
        items, fusion_report = hybrid.fused(dense, lex, count, settings)
        keys, scores = hybrid.fused_keys(items)
        stage = [hybrid.fused_stage_scores(item, rank) for rank, item in enumerate(items)]
        hits = await self._run.read(self._hits, col, keys, scores, text_for, stage)
        fusion_report.candidates_out = len(hits)
        return hits, [dense_report, lex_report, fusion_report], generation, tokens

    async def load(self, collection_id: int, hits: list[Hit]) -> None:
        """Fills in the text and metadata of the hits that were retrieved without them."""
        if any(not h.loaded for h in hits):
            await self._run.read(self.read_texts, collection_id, hits)

    def read_texts(self, collection_id: int, hits: list[Hit]) -> None:
        """load(), blocking (for a caller already in the read executor)."""
        hits = [h for h in hits if not h.loaded]
        if not hits:
            return
        docs = self._store.documents_by_keys(collection_id, [h.key for h in hits], with_text=True)
        for hit in hits:
            doc = docs.get(hit.key)
            if doc is not None:  # else replaced or deleted since the search began: it keeps no text
                hit.text, hit.metadata = doc.text, doc.metadata
            hit.loaded = True

    def _dense_hits(
        self,
        col: Collection,
        query: SearchQuery,
        count: int,
        settings: SearchSettings,
        text_for: int,
        query_tokens: bool,
    ) -> tuple[list[Hit], StageReport, QueryTokens | None]:
        started = time.perf_counter()
        ranked, report, tokens = self._dense(col, query, count, settings, query_tokens)
        hits = self._hits(col, ranked.keys, ranked.scores, text_for)
        report.candidates_out = len(hits)
        report.took_ms = (time.perf_counter() - started) * 1000
        return hits, report, tokens

    def _dense(
        self, col: Collection, query: SearchQuery, count: int, settings: SearchSettings, query_tokens: bool
    ) -> tuple[Ranked, StageReport, QueryTokens | None]:
        """The vector index's top `count` for the query's vector (its embedding, or the client's)."""
        started = time.perf_counter()
        tokens = None
        if query_tokens:
            vector, tokens = self._query_encoding(col, query.query)
        elif not query.query_vector:
            vector = self._query_vector(col, query.query)
        if query.query_vector:
            vector = validation.vector(query.query_vector, col.row.dims, "query_vector")
        if query.filter:
            keys, scores, method, seen = self._filtered_search(col, vector, query, count, settings)
        elif len(col.index) <= self._settings.full_scan_max:
            keys, scores = col.index.search_all(vector, count)
            method, seen = "exact", len(col.index)
        else:
            keys, scores = col.index.search(vector, count, settings.ef_search)
            method, seen = "hnsw", len(col.index)
        model_id = col.runner.model_id + (" (client vector)" if query.query_vector else "")
        report = StageReport(
            Stage.RETRIEVE,
            StageStatus.COMPLETED,
            candidates_in=seen,
            candidates_out=len(keys),
            took_ms=(time.perf_counter() - started) * 1000,
            model_id=model_id,
            method=method,
        )
        return Ranked(keys, scores), report, tokens

    def _hits(
        self,
        col: Collection,
        keys: np.ndarray,
        scores: np.ndarray,
        text_for: int,
        stage_scores: list[list[StageScore]] | None = None,
    ) -> list[Hit]:
        """Hits with their documents from the store, the first `text_for` with text and metadata;
        `stage_scores` per key (default: the dense score)."""
        found = keys.tolist()
        docs = self._store.documents_by_keys(col.row.id, found[:text_for], with_text=True) if text_for else {}
        loaded = set(docs)
        docs.update(self._store.documents_by_keys(col.row.id, found[text_for:], with_text=False))
        hits: list[Hit] = []
        for i, (key, score) in enumerate(zip(keys.tolist(), scores.tolist(), strict=True)):
            doc = docs.get(key)
            if doc is None:  # removed between the index search and the lookup
                continue
            stages = (
                stage_scores[i]
                if stage_scores is not None
                else [StageScore(Stage.RETRIEVE, score, len(hits))]
            )
            hits.append(Hit(doc.doc_id, score, doc.text, doc.metadata, stages, key=key, loaded=key in loaded))
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
