"""Latency budgets (issue 15): named tiers, the stage costs this server has measured, and the plan a
search makes against its budget before it starts.

A request with `latency_budget_ms` (or a tier, which brings a budget and depths) is planned before any
work, stage by stage, from each stage's measured cost: `took_ms ~ fixed + per_candidate x candidates`,
fitted by decayed least squares over the server's recent searches (`CostModel`; priors until there are
measurements). The planner keeps a REQUIRED stage whatever it costs (only the call's deadline stops it)
and gives each BEST_EFFORT re-ranking stage as many candidates as fit what is left (skipping it when fewer
than `MIN_CANDIDATES` do; the others follow in the previous order). That plan is made before retrieval;
each stage is planned again just before it starts, from the time really left (retrieval and the stages
before may have been faster or slower than estimated: a stage the first plan skipped may run, one it gave
all candidates may be cut or skipped), and the cross-encoder's worker call is given only the time left, so
a stage still running at the budget is cut (DEGRADED, previous order kept). A stage skipped by its
estimate is not measured, so an estimate that is old or rests on few measurements is tested with a probe
of `MIN_CANDIDATES` candidates rather than trusted forever (a loaded machine's costs fall when the load
does). Each stage's report says what the plan gave it (`plan`) and, when cut, from how many candidates
(`candidates_cut_from`).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sieve_core.types import (
    SearchSettings,
    SearchTier,
    Stage,
    StageMode,
    StageReport,
    StageStatus,
    TimeLimit,
)

if TYPE_CHECKING:  # the stages' plans (server/core/stage_plan.py imports this module)
    from server.core.stage_plan import StagePlan

MIN_CANDIDATES = 2  # a re-ranking stage given fewer cannot change an order: skip it instead
# A stage measured fewer times than this is tried on MIN_CANDIDATES candidates when the estimate says
# none fit but PROBE_MIN_MS are left: else a server whose prior is too pessimistic would never run (and so
# never measure) it under a budget. The call is cut at the budget like any other.
PROBE_OBSERVATIONS = 5
PROBE_MIN_MS = 10.0
# ...and also when it has not been measured for this long (its cost may have fallen since: a worker that
# was loading its model, a queue that has drained), so a stage skipped by its estimate is not skipped forever.
PROBE_INTERVAL_S = 5.0
# An observation counts for at most this many times the current cautious estimate: a first call that loads
# a model (seconds) must not make a stage look unaffordable for the next hundred searches; a real rise in
# cost still shows within a few observations (x3 each).
OUTLIER_FACTOR = 3.0
# A stage stopped at its time counts as having needed this many times what it was given (BudgetPlanner.observe).
STOP_FACTOR = 2.0
# Standard deviations a cautious estimate adds to the fit. A budget is a promise about the tail (the
# issue's: p95 within 10 % of it), so a stage must fit its time about 97 % of the time (mean + 2 sd, were
# the times normal), not 84 % (+1 sd).
CAUTION = 2.0
# Kept back from the budget for converting and sending the reply, which the server cannot time itself
# (about 1 ms for 10 hits with texts); the reply's own work is measured (BudgetPlanner.reply).
BUDGET_REPLY_MARGIN_MS = 2.0


@dataclass(frozen=True)
class Tier:
    budget_ms: int
    retrieve_candidates: int
    late_interaction_keep: int  # also the cross-encoder's candidates


TIERS = {
    SearchTier.FAST: Tier(25, 50, 20),
    SearchTier.BALANCED: Tier(60, 100, 30),
    SearchTier.BEST: Tier(400, 200, 50),
}


def expand_tier(s: SearchSettings) -> SearchSettings:
    """The settings with their tier's budget and depths filling the fields they leave unset."""
    tier = TIERS.get(s.tier)
    if tier is None:
        return s
    return replace(
        s,
        latency_budget_ms=s.latency_budget_ms or tier.budget_ms,
        retrieve_candidates=s.retrieve_candidates or tier.retrieve_candidates,
        late_interaction_keep=s.late_interaction_keep or tier.late_interaction_keep,
    )


class CostModel:
    """took_ms ~ fixed + per_candidate x n, by least squares with exponentially decaying weights (recent
    searches count most: the machine's load changes), started from a prior of two pseudo-observations."""

    def __init__(self, fixed_ms: float, per_candidate_ms: float, decay: float = 0.95) -> None:
        self._decay = decay
        self._s = [0.0] * 5  # sum w, w x, w y, w x^2, w x y
        self._sq = 0.0  # decayed sum of w * squared residual
        self._lock = threading.Lock()
        self.observed = 0
        self.last_observed = 0.0
        for n in (1, 50):
            self.observe(n, fixed_ms + per_candidate_ms * n)
        self._sq = 0.0  # the prior is a line: it has no spread (a first point alone fits a proportion)
        self.observed = 0  # real observations (the prior's two are not counted)

    def observe(self, n: int, took_ms: float) -> None:
        with self._lock:
            if self._s[0]:  # against the prior too: a stage's first call is the one that loads its model
                took_ms = min(took_ms, OUTLIER_FACTOR * (self._predict(n) + self._spread()))
            self.last_observed = time.monotonic()
            residual = took_ms - self._predict(n) if self._s[0] else 0.0
            d = self._decay
            self._s = [v * d for v in self._s]
            self._sq = self._sq * d + residual * residual
            w, x, y = 1.0, float(n), float(took_ms)
            for i, value in enumerate((w, w * x, w * y, w * x * x, w * x * y)):
                self._s[i] += value
            self.observed += 1

    def _fit(self) -> tuple[float, float]:
        sw, sx, sy, sxx, sxy = self._s
        denominator = sw * sxx - sx * sx
        if denominator <= 1e-9 * max(sw * sxx, 1.0):  # every observation at one n: proportional
            return 0.0, sy / max(sx, 1e-9)
        per = max((sw * sxy - sx * sy) / denominator, 0.0)
        return max((sy - per * sx) / sw, 0.0), per

    def _predict(self, n: int) -> float:
        fixed, per = self._fit()
        return fixed + per * n

    def fit(self) -> tuple[float, float, float]:
        """(fixed ms, ms per candidate, the residuals' standard deviation in ms)."""
        with self._lock:
            fixed, per = self._fit()
            spread = self._spread()
        return fixed, per, spread

    def _spread(self) -> float:
        return math.sqrt(self._sq / max(self._s[0], 1e-9))

    def probe_due(self) -> bool:
        """Too few measurements to trust, or none for a while (see PROBE_*)."""
        return self.observed < PROBE_OBSERVATIONS or time.monotonic() - self.last_observed > PROBE_INTERVAL_S

    def estimate(self, n: int) -> float:
        """A cautious estimate for n candidates: the fit plus CAUTION standard deviations."""
        fixed, per, spread = self.fit()
        return fixed + per * n + CAUTION * spread

    def fits(self, left_ms: float) -> int:
        """The most candidates whose cautious estimate fits in `left_ms` (0 if none)."""
        fixed, per, spread = self.fit()
        room = left_ms - fixed - CAUTION * spread
        if room < 0:
            return 0
        return 1_000_000 if per <= 0 else int(room / per)

    def describe(self) -> str:
        fixed, per, spread = self.fit()
        return f"est. {fixed:.1f} ms + {per:.2f} ms each, sd {spread:.1f} ms"


# Priors (ms) until a server has measured its own stages: one query encoding and an HNSW search; MaxSim
# over ~60 int8 rows per candidate; a Celery round trip (9-12 ms here) then ~1.5 ms per pair on 2 cores.
_PRIORS = {
    Stage.RETRIEVE: (10.0, 0.02),
    Stage.LATE_INTERACTION: (1.0, 0.08),
    Stage.CROSS_ENCODER: (12.0, 1.5),
}
# The reply after the last stage: the texts of the hits sent that were not read yet, their evidence spans,
# the result; per hit sent.
_REPLY_PRIOR = (1.0, 0.1)


class StageCosts:
    """The measured cost of each stage (per model for the cross-encoder), fed from stage reports."""

    def __init__(self) -> None:
        self._models: dict[tuple[Stage, str], CostModel] = {}
        self._lock = threading.Lock()

    def model(self, stage: Stage, key: str = "") -> CostModel:
        with self._lock:
            found = self._models.get((stage, key))
            if found is None:
                found = self._models[(stage, key)] = CostModel(*_PRIORS[stage])
            return found

    def observe(self, stage: Stage, key: str, candidates: int, took_ms: float) -> None:
        self.model(stage, key).observe(candidates, took_ms)


@dataclass
class BudgetPlan:
    """What the budget planner decided for one stage (see the module doc)."""

    note: str = ""  # the report's `plan`
    skip: str = ""  # non-empty: the stage does not run, for this reason
    cut_to: int = 0  # > 0: the stage scores only this many candidates


class BudgetPlanner:
    """Plans a search's stages against its latency budget, from the stage costs it has measured."""

    def __init__(self) -> None:
        self.costs = StageCosts()
        self.reply = CostModel(*_REPLY_PRIOR)  # fed by Searches with each final reply's own time

    def reply_ms(self, top_k: int) -> float:
        """What to keep back from a budget for the reply: its cautious estimate and the sending margin."""
        return self.reply.estimate(top_k) + BUDGET_REPLY_MARGIN_MS

    def plan(self, plans: list[StagePlan], budget_ms: float, retrieve_n: int, reply_ms: float) -> str:
        """Plans the stages against a latency budget before the search starts, keeping `reply_ms` back for
        the reply (reply_ms()); returns the retrieval's part of the plan (its report's `plan`)."""
        retrieve = self.costs.model(Stage.RETRIEVE)
        left = budget_ms - reply_ms - retrieve.estimate(retrieve_n)
        head = (
            f"budget {budget_ms:.0f} ms; retrieval {retrieve.describe()}; reply {reply_ms:.1f} ms kept back"
        )
        n_in = retrieve_n
        for plan in plans:
            if not plan.mode.enabled:
                continue
            cost = self.cost(plan)
            if plan.mode == StageMode.REQUIRED:
                left -= cost.estimate(n_in)
                plan.budget = BudgetPlan(note=f"REQUIRED: not cut by the budget ({cost.describe()})")
            else:
                plan.budget = self.fit(cost, left, n_in)
                if plan.budget.skip:
                    continue  # it would pass its input on unchanged
                left -= cost.estimate(plan.budget.cut_to or n_in)
            if plan.stage == Stage.LATE_INTERACTION:
                n_in = min(n_in, plan.keep)
        return head

    def cost(self, plan: StagePlan) -> CostModel:
        key = plan.model.name if plan.model is not None and plan.stage == Stage.CROSS_ENCODER else ""
        return self.costs.model(plan.stage, key)

    @staticmethod
    def fit(cost: CostModel, left_ms: float, n_in: int) -> BudgetPlan:
        """As many of a BEST_EFFORT stage's `n_in` candidates as fit in `left_ms`: none (skip), some (cut)
        or all; a few (a probe) when none fit by an estimate that is old or rests on few measurements."""
        fit = min(cost.fits(left_ms), n_in)
        note = f"{max(left_ms, 0):.0f} ms left: {fit} of {n_in} candidates fit ({cost.describe()})"
        if fit < min(MIN_CANDIDATES, n_in):
            if cost.probe_due() and left_ms >= PROBE_MIN_MS and n_in > MIN_CANDIDATES:
                probing = f"{note}; probing with {MIN_CANDIDATES} (the estimate is old or rests on few measurements)"
                return BudgetPlan(note=probing, cut_to=MIN_CANDIDATES)
            return BudgetPlan(note=note, skip=f"skipped by the latency budget: {note}")
        return BudgetPlan(note=note, cut_to=fit if fit < n_in else 0)

    def observe(self, plan: StagePlan, report: StageReport) -> None:
        """Feeds the stage cost model from a stage that really ran (cache hits cost nothing to learn)."""
        if report.status == StageStatus.SKIPPED or not report.candidates_in or report.method == "cache":
            return
        if report.took_ms <= 0:
            return
        cost = self.cost(plan)
        if report.status == StageStatus.COMPLETED:
            cost.observe(report.candidates_in, report.took_ms)
        elif report.time_limit == TimeLimit.STOPPED:
            # Stopped at its time: it needs more than it was given (how much more is unknown). It counts as
            # STOP_FACTOR x the more of that time and the fitted cost, so repeated stops push the estimate
            # out of the budget within a few searches instead of every search trying it again.
            n = report.candidates_in
            fixed, per, _ = cost.fit()
            cost.observe(n, STOP_FACTOR * max(report.took_ms, fixed + per * n))
