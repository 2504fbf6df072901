"""The re-ranking half of `Search`: late interaction to M candidates, then the cross-encoder to K.

Late interaction scores MaxSim here, in the server's executor, from the token vectors stored with the
collection's documents (server/core/tokens.py): the query's token vectors come from the retrieval's own
encoder pass (zero-shot) or, for a ColBERT bundle, from a small query-encoding task on a worker. The
cross-encoder runs on a Celery worker (server/dispatch/dispatcher.py) and is cached in Redis under a key
naming its model (revision and serving settings), the collection and its generation, the query and the
candidates' content (sieve_core/cache.py): a repeated search is answered from the cache without a worker,
and any write to the collection moves its generation, so nothing stale is ever served.

A stage that cannot finish keeps the previous stage's order and says why (DEGRADED); a stage the
request marks REQUIRED fails the request instead: UNAVAILABLE when the workers could not answer,
FAILED_PRECONDITION when no model is configured for it (or the collection stores no token vectors).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from functools import partial

from server.core.budget import BudgetPlan, BudgetPlanner
from server.core.stage_plan import StagePlan, StagePlanner
from server.core.tokens import QueryTokens, TokenStage
from server.dispatch.dispatcher import Dispatcher, OutOfTime, StageUnavailable
from sieve_core.cache import ResultCache, stage_scores_key
from sieve_core.config import Settings
from sieve_core.contracts import content_hash_hex
from sieve_core.errors import Unavailable
from sieve_core.models.registry import ModelRegistry
from sieve_core.types import (
    Hit,
    Stage,
    StageMode,
    StageReport,
    StageScore,
    StageStatus,
    TimeLimit,
)

log = logging.getLogger(__name__)

# Time kept back from the caller's deadline for building and sending the reply.
REPLY_MARGIN_S = 0.1


class Cascade:
    """Runs a search's planned re-ranking stages (stage_plan.py) in order, each against the time left."""

    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        dispatcher: Dispatcher,
        cache: ResultCache,
        pool: Executor,
        token_stage: TokenStage,
        load: Callable[[int, list[Hit]], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.models = models  # only manifests are read here: the workers run the re-rankers
        self.planner = StagePlanner(settings, models)  # resolves each request's stages before any work
        self.dispatcher = dispatcher
        self.cache = cache
        self._pool = pool
        self.token_stage = token_stage
        self._load = load  # fills in the texts of hits retrieved without them (the cross-encoder reads them)
        self.budget = BudgetPlanner()  # latency budgets: measured stage costs, plans

    async def run(
        self,
        plans: list[StagePlan],
        *,
        collection_id: int,
        generation: int,
        query: str,
        hits: list[Hit],
        top_k: int,
        deadline: float | None,
        budget_deadline: float | None = None,
        query_tokens: QueryTokens | None = None,
    ) -> AsyncIterator[tuple[StagePlan, list[Hit], StageReport]]:
        """Runs the planned stages in order over `hits`, yielding each one's ranking and report as it
        finishes (skipped ones too). `deadline` (the call's) and `budget_deadline` (when the request's
        latency budget wants the last stage done: its end less the reply's time) are time.monotonic() values. `query_tokens`: the query's token vectors from the retrieval's
        encoder pass (zero-shot)."""
        for plan in plans:
            if not plan.mode.enabled:
                yield plan, hits, StageReport(plan.stage, StageStatus.SKIPPED, reason="not requested")
                continue
            given = hits
            keep = max(plan.keep, top_k)
            # A stage the budget's first plan skipped is planned again at its start (from the time left).
            if plan.stage == Stage.LATE_INTERACTION:
                hits, report = await self._late_interaction_in_time(
                    plan, collection_id, query, hits, keep, deadline, budget_deadline, query_tokens
                )
            else:
                hits, report = await self._cross_encoder(
                    plan, collection_id, generation, query, hits, keep, deadline, budget_deadline
                )
            if report.status == StageStatus.DEGRADED and plan.mode == StageMode.REQUIRED:
                raise Unavailable(f"{plan.stage.name.lower()} is required but could not run: {report.reason}")
            if plan.budget is not None and not report.plan:
                report.plan = plan.budget.note
            self.budget.observe(plan, report)
            before, after = [h.id for h in given[:top_k]], [h.id for h in hits[:top_k]]
            report.top_k_changed = report.status == StageStatus.COMPLETED and before != after
            report.top_k_new = len(set(after) - set(before)) if report.top_k_changed else 0
            yield plan, hits, report

    async def _late_interaction_in_time(
        self,
        plan: StagePlan,
        collection_id: int,
        query: str,
        hits: list[Hit],
        keep: int,
        deadline: float | None,
        budget_deadline: float | None,
        query_tokens: QueryTokens | None,
    ) -> tuple[list[Hit], StageReport]:
        """Late interaction, planned again from the time really left when it starts (MaxSim runs in the
        executor and cannot be stopped midway, so a slow retrieval must leave it less to do): skipped,
        or scoring only the first candidates that fit, the others following in the previous order."""
        again = self._at_start(plan, budget_deadline, len(hits))
        scored = hits[: again.cut_to] if again is not None and again.cut_to else hits
        if again is not None and again.skip:
            ranked, report = hits, _skipped(plan, again.skip, len(hits))
        else:
            ranked, report = await self._late_interaction(
                plan, collection_id, query, scored, keep, deadline, budget_deadline, query_tokens
            )
        if again is not None:
            report.plan = f"{plan.budget.note}; at start: {again.note}" if plan.budget else again.note
        if len(scored) < len(hits) and report.status == StageStatus.COMPLETED:
            ranked = (ranked + hits[len(scored) :])[:keep]
            report.candidates_cut_from, report.candidates_out = len(hits), len(ranked)
        return ranked, report

    def _at_start(self, plan: StagePlan, budget_deadline: float | None, n_in: int) -> BudgetPlan | None:
        """A BEST_EFFORT stage's plan from the time left now (None: no budget, or a REQUIRED stage)."""
        if budget_deadline is None or plan.mode == StageMode.REQUIRED:
            return None
        left_ms = (budget_deadline - time.monotonic()) * 1000
        return self.budget.fit(self.budget.cost(plan), left_ms, n_in)

    async def _late_interaction(
        self,
        plan: StagePlan,
        collection_id: int,
        query: str,
        hits: list[Hit],
        keep: int,
        deadline: float | None,
        budget_deadline: float | None,
        query_tokens: QueryTokens | None,
    ) -> tuple[list[Hit], StageReport]:
        started = time.perf_counter()
        tokens, model = plan.tokens, plan.model
        if tokens is None or model is None:
            reason = f"{plan.unavailable}; kept the previous order"
            return hits, StageReport(plan.stage, StageStatus.DEGRADED, reason, len(hits), len(hits))
        if not hits:
            return hits, StageReport(plan.stage, StageStatus.COMPLETED, model_id=model.label)
        if query_tokens is None:  # a ColBERT bundle: its query encoder runs on a worker
            timeout_s, bound = self._time_left(deadline, budget_deadline)
            try:
                query_tokens = await self.token_stage.query_tokens(tokens, query, timeout_s)
            except StageUnavailable as exc:
                took = (time.perf_counter() - started) * 1000
                report = StageReport(
                    plan.stage, StageStatus.DEGRADED, _why(exc, bound), len(hits), len(hits), took
                )
                report.model_id, report.method = model.label, "query tokens: worker"
                report.time_limit = _time_limit(exc)
                return hits, report
        ranked, report = await self.token_stage.score(collection_id, tokens, query_tokens, hits, keep)
        report.took_ms = (time.perf_counter() - started) * 1000
        return ranked, report

    def _time_left(self, deadline: float | None, budget_deadline: float | None) -> tuple[float, str]:
        """Seconds a worker call may take, and what bounds it: the server's re-rank timeout, the call's
        deadline (less the reply's margin) or the latency budget (`budget_deadline` keeps the reply's time
        back already)."""
        now = time.monotonic()
        bounds = [(self.settings.rerank_timeout_s, "the re-rank timeout")]
        if deadline is not None:
            bounds.append((deadline - now - REPLY_MARGIN_S, "the call's deadline"))
        if budget_deadline is not None:
            bounds.append((budget_deadline - now, "the latency budget"))
        return min(bounds)

    async def _cross_encoder(
        self,
        plan: StagePlan,
        collection_id: int,
        generation: int,
        query: str,
        hits: list[Hit],
        keep: int,
        deadline: float | None,
        budget_deadline: float | None = None,
    ) -> tuple[list[Hit], StageReport]:
        started = time.perf_counter()
        given = hits
        cut_from = 0

        def report(
            status: StageStatus,
            *,
            out: int,
            model: str = "",
            method: str = "",
            reason: str = "",
            limit: TimeLimit = TimeLimit.NONE,
        ) -> StageReport:
            took = (time.perf_counter() - started) * 1000
            made = StageReport(plan.stage, status, reason, len(hits), out, took, model, method)
            made.candidates_cut_from, made.plan, made.time_limit = cut_from, note, limit
            return made

        model = plan.model
        note = plan.budget.note if plan.budget is not None else ""
        if model is None:
            return hits, report(
                StageStatus.DEGRADED, out=len(hits), reason=f"{plan.unavailable}; kept the previous order"
            )
        if not hits:
            return hits, report(StageStatus.COMPLETED, out=0, model=model.label)
        again = self._at_start(plan, budget_deadline, len(hits))
        if again is not None:
            # Planned again from the time really left: the stages before may have run faster or slower.
            note = f"{note}; at start: {again.note}" if note else again.note
            if again.skip:
                skipped = TimeLimit.SKIPPED
                return hits, report(
                    StageStatus.DEGRADED, out=len(hits), model=model.label, reason=again.skip, limit=skipped
                )
            if again.cut_to:
                cut_from, hits = len(hits), hits[: again.cut_to]
        if self._load is not None:
            await self._load(collection_id, hits)
        texts = [h.text for h in hits]
        key = stage_scores_key(
            plan.stage.name.lower(),
            model.cache_id,
            collection_id,
            generation,
            query,
            [content_hash_hex(t) for t in texts],
        )
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._pool, partial(self.cache.get_scores, key, len(hits)))
        method = "cache"
        if scores is None:
            timeout_s, bound = self._time_left(deadline, budget_deadline)
            try:
                result = await self.dispatcher.cross_encoder(model.name, query, texts, timeout_s)
            except StageUnavailable as exc:
                return given, report(
                    StageStatus.DEGRADED,
                    out=len(given),
                    model=model.label,
                    method="worker",
                    reason=_why(exc, bound),
                    limit=_time_limit(exc),
                )
            scores = list(result.scores)
            method = f"worker (pair scores: {result.cache_hits} cached, {result.computed} computed)"
            await loop.run_in_executor(self._pool, partial(self.cache.put_scores, key, scores))
        # Candidates the budget left out follow the scored ones, in the previous stage's order.
        ranked = (_rank(hits, scores, plan.stage, keep) + given[len(hits) :])[:keep]
        return ranked, report(StageStatus.COMPLETED, out=len(ranked), model=model.label, method=method)


def _skipped(plan: StagePlan, reason: str, n: int) -> StageReport:
    """A stage the latency budget left out before it started: DEGRADED, its input passed on unchanged."""
    return StageReport(plan.stage, StageStatus.DEGRADED, reason, n, n, time_limit=TimeLimit.SKIPPED)


def _time_limit(exc: StageUnavailable) -> TimeLimit:
    if isinstance(exc, OutOfTime):
        return TimeLimit.STOPPED if exc.started else TimeLimit.SKIPPED
    return TimeLimit.NONE


def _why(exc: StageUnavailable, bound: str) -> str:
    """A worker call's failure as a stage report's reason; a timeout names what set it."""
    cut = f" (cut by {bound})" if isinstance(exc, OutOfTime) else ""
    return f"{exc}{cut}; kept the previous order"


def _rank(hits: list[Hit], scores: list[float], stage: Stage, keep: int) -> list[Hit]:
    order = sorted(range(len(hits)), key=lambda i: -scores[i])[:keep]
    ranked = []
    for rank, i in enumerate(order):
        hit = hits[i]
        hit.score = scores[i]
        hit.stage_scores.append(StageScore(stage, scores[i], rank))
        ranked.append(hit)
    return ranked
