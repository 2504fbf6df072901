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
from server.storage.store import Store
from sieve_core.cache import ResultCache, query_vector_key
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
        self, col: Collection, query: SearchQuery, count: int, settings: SearchSettings, with_text: bool
    ) -> tuple[list[Hit], list[StageReport], int]:
        """The first stage: the `count` best documents by the dense index, BM25, or both fused (as
        settings.retrieval says), each part's report, and the generation the indexes showed."""
        generation = col.visible_generation  # every write up to here is in the indexes
        mode = settings.retrieval if settings.retrieval != RetrievalMode.UNSPECIFIED else RetrievalMode.DENSE
        if mode == RetrievalMode.DENSE:
            hits, report = await self._run.read(self._dense_hits, col, query, count, settings, with_text)
            return hits, [report], generation
        fulltext = col.fulltext
        if fulltext is None:  # never for a loaded collection; a guard for the type checker
            raise FailedPrecondition(f"collection {col.row.name!r} has no full-text index")
        lexical = self._run.read(
            hybrid.lexical, self._store, col.row.id, fulltext, query.query, query.filter, count
        )
        if mode == RetrievalMode.LEXICAL:
            ranked, report = await lexical
            stage = [[StageScore(Stage.LEXICAL, s, i)] for i, s in enumerate(ranked.scores.tolist())]
            hits = await self._run.read(self._hits, col, ranked.keys, ranked.scores, with_text, stage)
            return hits, [report], generation
        # Hybrid: both sides at once (two executor threads), then the fusion.
        (dense, dense_report), (lex, lex_report) = await asyncio.gather(
            self._run.read(self._dense, col, query, count, settings), lexical
        )
        items, fusion_report = hybrid.fused(dense, lex, count, settings)
        keys, scores = hybrid.fused_keys(items)
        stage = [hybrid.fused_stage_scores(item, rank) for rank, item in enumerate(items)]
        hits = await self._run.read(self._hits, col, keys, scores, with_text, stage)
        fusion_report.candidates_out = len(hits)
        return hits, [dense_report, lex_report, fusion_report], generation

    def _dense_hits(
        self, col: Collection, query: SearchQuery, count: int, settings: SearchSettings, with_text: bool
    ) -> tuple[list[Hit], StageReport]:
        started = time.perf_counter()
        ranked, report = self._dense(col, query, count, settings)
        hits = self._hits(col, ranked.keys, ranked.scores, with_text)
        report.candidates_out = len(hits)
        report.took_ms = (time.perf_counter() - started) * 1000
        return hits, report

    def _dense(
        self, col: Collection, query: SearchQuery, count: int, settings: SearchSettings
    ) -> tuple[Ranked, StageReport]:
        """The vector index's top `count` for the query's vector (its embedding, or the client's)."""
        started = time.perf_counter()
        if query.query_vector:
            vector = validation.vector(query.query_vector, col.row.dims, "query_vector")
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
        report = StageReport(
            Stage.RETRIEVE,
            StageStatus.COMPLETED,
            candidates_in=seen,
            candidates_out=len(keys),
            took_ms=(time.perf_counter() - started) * 1000,
            model_id=col.runner.model_id
            if not query.query_vector
            else f"{col.runner.model_id} (client vector)",
            method=method,
        )
        return Ranked(keys, scores), report

    def _hits(
        self,
        col: Collection,
        keys: np.ndarray,
        scores: np.ndarray,
        with_text: bool,
        stage_scores: list[list[StageScore]] | None = None,
    ) -> list[Hit]:
        """Hits with their documents from the store; `stage_scores` per key (default: the dense score)."""
        docs = self._store.documents_by_keys(col.row.id, keys.tolist(), with_text=with_text)
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
            hits.append(Hit(doc.doc_id, score, doc.text, doc.metadata, stages))
        return hits

    def _query_vector(self, col: Collection, text: str) -> np.ndarray:
        """The query's embedding, from the Redis cache when this model has embedded it before."""
        key = query_vector_key(col.runner.manifest.cache_id, text)
        vector = self._cache.get_vector(key, col.runner.dims)
        if vector is None:
            vector = col.runner.embed([text])[0]
            self._cache.put_vector(key, vector)
        return vector

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
