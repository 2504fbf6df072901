"""A search as a sequence of updates (issue 15): `Search` is the last one, `SearchStream` sends each.

The retrieval's ranking is an update as soon as it exists; each re-ranking stage that runs (or degrades)
makes the next; the last is final. Search and SearchStream run this same code (Search asks only for the
final update), so a stream's final message is Search's answer by construction, not by a second path.
A request with a latency budget (or a tier) is planned against it before any work (server/core/budget.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from server.core import validation
from server.core.budget import expand_tier
from server.core.cascade import Cascade
from server.core.collections import Collection, Collections
from server.core.executors import Executors
from server.core.retrieval import Retrieval
from server.core.stage_plan import StagePlan
from server.core.writes import Writes
from server.storage.fulltext import FullTextIndex
from sieve_core.config import Settings
from sieve_core.evidence import evidence_spans_many, lexical_spans
from sieve_core.types import (
    Hit,
    SearchQuery,
    SearchResult,
    SearchSettings,
    SearchUpdate,
    Stage,
    StageReport,
    StageStatus,
    TimeLimit,
)


@dataclass
class _Planned:
    """One search, checked and planned, before any retrieval."""

    query: SearchQuery
    top_k: int
    col: Collection
    settings: SearchSettings
    plans: list[StagePlan]
    candidates: int
    started: float  # perf_counter: took_ms counts from here
    deadline: float | None  # monotonic: the call's
    budget_deadline: float | None  # monotonic: when the budget wants the stages done (the reply's time left)
    budget_note: str = ""


class Searches:
    """Runs searches: checks, plans (stages, budget), retrieves, re-ranks, and makes each update."""

    def __init__(
        self,
        settings: Settings,
        collections: Collections,
        writes: Writes,
        retrieval: Retrieval,
        cascade: Cascade,
        run: Executors,
    ) -> None:
        self.settings = settings
        self.collections = collections
        self.writes = writes
        self.retrieval = retrieval
        self.cascade = cascade
        self._run = run

    async def search(self, query: SearchQuery, timeout_s: float | None = None) -> SearchResult:
        """Wait for `min_generation` if asked, retrieve, then re-rank as the settings ask. `timeout_s`:
        time left before the caller's deadline."""
        updates = [u async for u in self.stream(query, timeout_s, progress=False)]
        assert updates and updates[-1].final
        return updates[-1].result

    async def stream(
        self, query: SearchQuery, timeout_s: float | None = None, *, progress: bool = True
    ) -> AsyncIterator[SearchUpdate]:
        """One update per stage that ran, the last final. `progress=False`: the final update only (no
        copies or evidence for rankings nobody sees)."""
        p = await self._plan(query, timeout_s)
        # Texts are read for the hits the first reply sends; the cross-encoder reads its candidates' (and a
        # later reply those it sends) when it needs them. Late interaction reads token vectors by key.
        text_for = 0 if query.omit_documents else p.top_k
        # Zero-shot late interaction: the query's token vectors come from the retrieval's encoder pass.
        query_tokens = any(plan.tokens is not None and plan.tokens.zero_shot for plan in p.plans)
        retrieving = time.perf_counter()
        hits, first_stage, generation, tokens = await self.retrieval.retrieve(
            p.col, query, p.candidates, p.settings, text_for, query_tokens
        )
        first_stage[0].plan = p.budget_note
        # The first stage's wall time (dense and lexical run at once in hybrid retrieval, then the fusion).
        took_ms = (time.perf_counter() - retrieving) * 1000
        self.cascade.budget.costs.observe(Stage.RETRIEVE, "", p.candidates, took_ms)
        reports = list(first_stage)
        # A stage's update goes out as it finishes; OFF stages report SKIPPED, with the next update.
        last = max((i for i, plan in enumerate(p.plans) if plan.mode.enabled), default=-1)
        skipped = [StageReport(plan.stage, StageStatus.SKIPPED, reason="not requested") for plan in p.plans]
        if last < 0:
            reports += skipped
        if progress or last < 0:
            yield await self._update(p, hits, reports, generation, Stage.RETRIEVE, last < 0)
        if last < 0:
            return
        stages = self.cascade.run(
            p.plans,
            collection_id=p.col.row.id,
            generation=generation,
            query=query.query,
            hits=hits,
            top_k=p.top_k,
            deadline=p.deadline,
            budget_deadline=p.budget_deadline,
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
            if progress or final:
                cut = final and any(_cut_by_time(r) for r in reports)
                yield await self._update(p, hits, reports, generation, plan.stage, final, cut)

    async def _plan(self, query: SearchQuery, timeout_s: float | None) -> _Planned:
        """Checks the request once, in full, before any wait or work: arguments, then the models its
        REQUIRED stages need (the cascade's plan); waits for `min_generation`; plans the budget."""
        started, begun = time.perf_counter(), time.monotonic()
        deadline = None if timeout_s is None else begun + timeout_s
        top_k = validation.search(query, self.settings)
        col = self.collections.find(query.collection)
        settings = expand_tier(query.settings).over(expand_tier(col.defaults)).over(self.collections.defaults)
        validation.search_inputs(query, settings)
        plans = self.cascade.planner.plan(
            settings, col.row.embedding_model, top_k, collection=col.row.name, tokens=col.tokens
        )
        if query.min_generation:
            wait_s = self.settings.min_generation_wait_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic() - 0.05)
            waiting = time.perf_counter()
            await self.writes.wait_for_generation(col, query.min_generation, wait_s)
            waited = time.perf_counter() - waiting
            started, begun = started + waited, begun + waited  # took_ms and the budget exclude the wait
        reranking = any(plan.mode.enabled for plan in plans)
        candidates = max(top_k, settings.retrieve_candidates or 0) if reranking else top_k
        planned = _Planned(query, top_k, col, settings, plans, candidates, started, deadline, None)
        if settings.latency_budget_ms is not None:
            budget = self.cascade.budget
            reply_ms = budget.reply_ms(top_k)
            planned.budget_deadline = begun + (settings.latency_budget_ms - reply_ms) / 1000
            planned.budget_note = budget.plan(plans, settings.latency_budget_ms, candidates, reply_ms)
        return planned

    async def _update(
        self,
        p: _Planned,
        hits: list[Hit],
        reports: list[StageReport],
        generation: int,
        stage: Stage,
        final: bool,
        deadline_reached: bool = False,
    ) -> SearchUpdate:
        """The ranking so far as a reply: copies of the top hits (later stages go on changing theirs),
        their evidence spans worked out (in the executor: a few blobs' span sections decoded, a few texts
        analysed)."""
        replying = time.perf_counter()
        top = hits[: p.top_k]
        # With omit_documents no text is read, so lexical hits carry no spans (late interaction's need none).
        lexical, reading = (None, False) if p.query.omit_documents else (p.col.fulltext, True)
        if any((reading and not h.loaded) or _evidence_due(h, lexical is not None) for h in top):
            # One trip to the executor for the texts still unread and the evidence of the hits sent.
            sent = await self._run.read(self._reply_hits, p, top, lexical)
        else:
            sent = [replace(h, stage_scores=list(h.stage_scores)) for h in top]
        if p.query.omit_documents:
            for hit in sent:
                hit.text, hit.metadata = "", {}
        now = time.perf_counter()
        if final:  # what a budget must keep back for the reply (server/core/budget.py)
            self.cascade.budget.reply.observe(len(sent), (now - replying) * 1000)
        took = (now - p.started) * 1000
        return SearchUpdate(
            SearchResult(sent, list(reports), generation, took), stage, final, deadline_reached
        )

    def _reply_hits(self, p: _Planned, top: list[Hit], lexical: FullTextIndex | None) -> list[Hit]:
        """Copies of the hits a reply sends (later stages go on changing the originals), their texts read
        (unless omit_documents) and their evidence worked out (blocking: run it in the read executor)."""
        if not p.query.omit_documents:
            self.retrieval.read_texts(p.col.row.id, top)
        sent = [replace(h, stage_scores=list(h.stage_scores)) for h in top]
        _resolve_evidence(sent, p.query.query, lexical)
        return sent


def _evidence_due(hit: Hit, lexical: bool) -> bool:
    """Whether a sent hit has evidence to work out: late interaction scored it (its spans win: the later,
    finer stage), or it was found lexically (BM25 ranked it) and its text is at hand."""
    if hit.evidence:
        return False
    return hit.matches is not None or _lexical_hit(hit, lexical)


def _lexical_hit(hit: Hit, lexical: bool) -> bool:
    return lexical and bool(hit.text) and any(s.stage == Stage.LEXICAL for s in hit.stage_scores)


def _resolve_evidence(hits: list[Hit], query: str, fulltext: FullTextIndex | None) -> None:
    due = [hit for hit in hits if _evidence_due(hit, fulltext is not None)]
    # Late interaction's spans for every hit it scored, in one pass over all their blobs.
    scored = [(hit, hit.matches) for hit in due if hit.matches is not None]
    for (hit, _), spans in zip(scored, evidence_spans_many([m for _, m in scored]), strict=True):
        hit.evidence = spans
    weights: dict[str, float] | None = None  # the query's terms, analysed once per reply
    for hit in due:
        # Lexical spans when late interaction did not score the hit, or has no spans for it (token
        # vectors stored before offsets were).
        if not hit.evidence and fulltext is not None and _lexical_hit(hit, True):
            if weights is None:
                weights = fulltext.term_weights(query)
            hit.evidence = lexical_spans(fulltext.occurrences(hit.text, weights), weights)


def _cut_by_time(report: StageReport) -> bool:
    """A stage the call's deadline or the latency budget stopped (or the budget skipped)."""
    return report.time_limit != TimeLimit.NONE
