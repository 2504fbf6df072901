"""The server's core, as the transport and the jobs see it: a thin facade over its parts.

- collections.py: the collections, their indexes (loaded, caught up, snapshotted) and models;
- writes.py: document writes on the single writer thread;
- retrieval.py: the query vector and the index search (the first stage of a search), reads by id;
- cascade.py: the re-ranking stages: late interaction here (tokens.py), the cross-encoder on the workers;
- tokens.py: stored token vectors: formats, the late-interaction stage, the backfill of pending ones;
- validation.py: every request's arguments, checked once, here or in the part that serves the request.

Transport-free (no protobuf): the gRPC servicers translate messages to these calls and back. Blocking
work (ONNX, usearch, SQLite) runs in executors (executors.py), so the event loop never blocks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np

from server.core import validation
from server.core.budget import expand_tier
from server.core.cascade import Cascade
from server.core.collections import Collections, ModelRegistry
from server.core.executors import Executors
from server.core.indexing import IndexTarget
from server.core.retrieval import Retrieval
from server.core.tokens import TokenBackfill, TokenStage
from server.core.writes import Writes
from server.dispatch.dispatcher import Dispatcher
from server.storage.store import Store
from sieve_core.cache import ResultCache
from sieve_core.config import Settings
from sieve_core.evidence import evidence_spans
from sieve_core.late_interaction_service import encode_documents
from sieve_core.types import (
    CollectionInfo,
    CollectionSpec,
    Document,
    Hit,
    SearchQuery,
    SearchResult,
    SearchUpdate,
    Stage,
    StageReport,
    StageStatus,
    WriteResult,
)


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.data_dir / "sieve.db")
        self.models = ModelRegistry(settings)
        self.dispatcher = Dispatcher(settings)
        self.cache = ResultCache.from_settings(settings)
        self._run = Executors(settings)
        self.collections = Collections(settings, self.store, self.models, self._run)
        self.backfill = TokenBackfill(
            settings,
            self.store,
            self.dispatcher,
            self.collections.with_pending_tokens,
            self.models.token_blobs,
            self._run.read,
            self._run.write,
        )
        self.writes = Writes(settings, self.store, self.collections, self._run, self.backfill.wake)
        self.retrieval = Retrieval(settings, self.store, self.collections, self.cache, self._run)
        token_stage = TokenStage(settings, self.store, self.dispatcher, self.cache, self._run.read)
        self.cascade = Cascade(
            settings, self.dispatcher, self.cache, self._run.pool, token_stage, self.retrieval.load
        )

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the default model and every collection's index, on the writer thread; then start the
        loop that has pending documents' token vectors computed."""
        await self._run.run(self._run.writer, self.collections.open)
        self.backfill.start()

    async def close(self) -> None:
        """Stop the token backfill, snapshot every index, then stop the executors."""
        await self.backfill.stop()
        await self._run.run(self._run.writer, self.collections.snapshot_all)
        self.dispatcher.close()
        self._run.shutdown()

    # -- collections and documents ---------------------------------------------------------------
    async def create_collection(self, spec: CollectionSpec) -> CollectionInfo:
        return await self.collections.create(spec)

    async def get_collection(self, name: str) -> CollectionInfo:
        return await self.collections.describe(name)

    async def list_collections(self) -> list[CollectionInfo]:
        return await self.collections.list_infos()

    async def delete_collection(self, name: str) -> None:
        await self.collections.delete(name)

    async def upsert(self, name: str, docs: list[Document]) -> WriteResult:
        return await self.writes.upsert(name, docs)

    async def upsert_embedded(
        self,
        name: str,
        docs: list[Document],
        vectors: dict[str, np.ndarray],
        tokens: dict[str, bytes] | None = None,
    ) -> WriteResult:
        return await self.writes.upsert_embedded(name, docs, vectors, tokens)

    async def get_documents(self, name: str, ids: list[str]) -> tuple[list[Document], list[str]]:
        return await self.retrieval.get_documents(name, ids)

    async def delete_documents(self, name: str, ids: list[str]) -> WriteResult:
        return await self.writes.delete_documents(name, ids)

    # -- search ----------------------------------------------------------------------------------
    async def search(self, query: SearchQuery, timeout_s: float | None = None) -> SearchResult:
        """Wait for `min_generation` if asked, retrieve, then re-rank as the settings ask. `timeout_s`:
        time left before the caller's deadline. The last update of `search_stream`, so a streamed
        search ends with exactly this answer."""
        updates = [u async for u in self.search_stream(query, timeout_s, progress=False)]
        assert updates and updates[-1].final
        return updates[-1].result

    async def search_stream(
        self, query: SearchQuery, timeout_s: float | None = None, *, progress: bool = True
    ) -> AsyncIterator[SearchUpdate]:
        """The search, one update per stage that ran: the retrieval's ranking as soon as it exists, then
        each re-ranking stage's (or its DEGRADED report); the last update is final. `progress=False`:
        the final update only (Search: no copies or evidence for rankings nobody sees)."""
        started = time.perf_counter()
        begun = time.monotonic()
        deadline = None if timeout_s is None else begun + timeout_s
        # The request is checked here once, in full, before any wait or work: arguments, then the models
        # its REQUIRED stages need (the cascade's plan).
        top_k = validation.search(query, self.settings)
        col = self.collections.find(query.collection)
        settings = expand_tier(query.settings).over(expand_tier(col.defaults)).over(self.collections.defaults)
        plans = self.cascade.plan(
            settings, col.row.embedding_model, top_k, collection=col.row.name, tokens=col.tokens
        )
        if query.min_generation:
            wait_s = self.settings.min_generation_wait_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic() - 0.05)
            waiting = time.perf_counter()
            await self.writes.wait_for_generation(col, query.min_generation, wait_s)
            started += time.perf_counter() - waiting  # took_ms is the search's time, without the wait
            begun += time.perf_counter() - waiting
        reranking = any(p.mode.enabled for p in plans)
        candidates = max(top_k, settings.retrieve_candidates or 0) if reranking else top_k
        budget_deadline, budget_note = None, ""
        if settings.latency_budget_ms is not None:
            budget_deadline = begun + settings.latency_budget_ms / 1000
            budget_note = self.cascade.plan_budget(plans, settings.latency_budget_ms, candidates)
        # Texts are read for the hits the first reply sends; the cross-encoder reads its candidates' (and a
        # later reply those it sends) when it needs them. Late interaction reads token vectors by key.
        text_for = 0 if query.omit_documents else top_k
        # Zero-shot late interaction: the query's token vectors come from the retrieval's encoder pass.
        query_tokens = any(p.tokens is not None and p.tokens.zero_shot for p in plans)
        hits, report, generation, tokens = await self.retrieval.retrieve(
            col, query, candidates, settings, text_for, query_tokens
        )
        report.plan = budget_note
        self.cascade.costs.observe(Stage.RETRIEVE, "", candidates, report.took_ms)
        reports = [report]
        # A stage's update goes out as it finishes; OFF stages report SKIPPED, with the next update.
        last = max((i for i, p in enumerate(plans) if p.mode.enabled), default=-1)
        skipped = [StageReport(p.stage, StageStatus.SKIPPED, reason="not requested") for p in plans]
        if last < 0:
            reports += skipped
        if progress or last < 0:
            yield await self._update(
                col.row.id, query, hits, top_k, reports, generation, started, Stage.RETRIEVE, last < 0
            )
        if last < 0:
            return
        stages = self.cascade.run(
            plans,
            collection_id=col.row.id,
            generation=generation,
            query=query.query,
            hits=hits,
            top_k=top_k,
            deadline=deadline,
            budget_deadline=budget_deadline,
            query_tokens=tokens,
        )
        index = -1
        async for plan, hits, stage_report in stages:
            index += 1
            reports.append(stage_report)
            if not plan.mode.enabled:
                continue
            final = index == last
            if final:
                reports += skipped[index + 1 :]
            if not (progress or final):
                continue
            cut = final and any(_cut_by_time(r) for r in reports)
            yield await self._update(
                col.row.id, query, hits, top_k, reports, generation, started, plan.stage, final, cut
            )

    async def _update(
        self,
        collection_id: int,
        query: SearchQuery,
        hits: list[Hit],
        top_k: int,
        reports: list[StageReport],
        generation: int,
        started: float,
        stage: Stage,
        final: bool,
        deadline_reached: bool = False,
    ) -> SearchUpdate:
        """The ranking so far as a reply: copies of the top hits (later stages go on changing theirs),
        their evidence spans worked out (in the executor: a few blobs' span sections decoded)."""
        if not query.omit_documents:
            await self.retrieval.load(collection_id, hits[:top_k])
        sent = [replace(h, stage_scores=list(h.stage_scores)) for h in hits[:top_k]]
        if any(h.matches is not None and not h.evidence for h in sent):
            await self._run.read(_resolve_evidence, sent)
        if query.omit_documents:
            for hit in sent:
                hit.text, hit.metadata = "", {}
        took = (time.perf_counter() - started) * 1000
        result = SearchResult(sent, list(reports), generation, took)
        return SearchUpdate(result, stage, final, deadline_reached)

    # -- for index jobs (server.core.indexing.IndexingEngine) --------------------------------------
    async def index_target(self, name: str) -> IndexTarget:
        col = self.collections.get(name)
        info = await self.collections.describe(name)
        if col.tokens is None:
            return IndexTarget(info, None, None)
        return IndexTarget(info, col.tokens.fmt, None if col.tokens.zero_shot else col.tokens.model)

    def unchanged_ids(self, collection: str, docs: list[Document]) -> set[str]:
        return self.store.unchanged_ids(self.collections.get(collection).row.id, docs)

    def embed(self, collection: str, texts: list[str]) -> tuple[np.ndarray, list[bytes] | None]:
        col = self.collections.get(collection)
        fmt = col.tokens.fmt if col.tokens is not None and col.tokens.zero_shot else None
        return encode_documents(col.runner, texts, fmt, self.settings.embed_batch_size)


def _resolve_evidence(hits: list[Hit]) -> None:
    for hit in hits:
        if hit.matches is not None and not hit.evidence:
            blob, best = hit.matches
            hit.evidence = evidence_spans(blob, best)


def _cut_by_time(report: StageReport) -> bool:
    """A stage the call's deadline or the latency budget stopped (or the budget skipped)."""
    return report.status == StageStatus.DEGRADED and (
        "latency budget" in report.reason
        or "answered within" in report.reason
        or "no time left" in report.reason
    )
