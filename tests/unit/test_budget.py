"""Latency budgets: the stage cost model, tiers, and the plan made before a search starts (no processes:
the planner only reads the cost model)."""

from __future__ import annotations

import random

import pytest

from server.core.budget import (
    BUDGET_REPLY_MARGIN_MS,
    MIN_CANDIDATES,
    OUTLIER_FACTOR,
    PROBE_INTERVAL_S,
    TIERS,
    BudgetPlan,
    BudgetPlanner,
    CostModel,
    expand_tier,
)
from server.core.cascade import Cascade
from server.core.stage_plan import StageModel, StagePlan
from sieve_core.types import SearchSettings, SearchTier, Stage, StageMode, StageReport, StageStatus, TimeLimit


def test_the_cost_model_learns_fixed_and_per_candidate_costs() -> None:
    model = CostModel(fixed_ms=1.0, per_candidate_ms=0.01)  # a wrong prior
    noise = random.Random(0)
    for _ in range(200):
        n = noise.randint(2, 40)
        model.observe(n, 10.0 + 1.5 * n + noise.uniform(-0.5, 0.5))
    fixed, per, spread = model.fit()
    assert fixed == pytest.approx(10.0, abs=1.0) and per == pytest.approx(1.5, abs=0.1)
    assert 0 < spread < 1.0
    # Cautious: the estimate is above the fit; `fits` inverts it.
    assert model.estimate(20) > 10.0 + 1.5 * 20
    n = model.fits(40.0)
    assert model.estimate(n) <= 40.0 < model.estimate(n + 1)
    assert model.fits(5.0) == 0


def test_tiers_fill_only_what_the_settings_leave_unset() -> None:
    mine = SearchSettings(tier=SearchTier.FAST, retrieve_candidates=7)
    expanded = expand_tier(mine)
    fast = TIERS[SearchTier.FAST]
    assert expanded.latency_budget_ms == fast.budget_ms
    assert expanded.retrieve_candidates == 7
    assert expanded.late_interaction_keep == fast.late_interaction_keep
    assert expand_tier(SearchSettings()) == SearchSettings()


REPLY_MS = 3.0  # kept back for the reply


def _cascade() -> Cascade:
    # The planner reads only the cost model: no dispatcher, cache, pool or token stage needed.
    return Cascade(None, None, None, None, None, None)  # type: ignore[arg-type]


def _plans(li: StageMode, ce: StageMode, keep: int = 30) -> list[StagePlan]:
    return [
        StagePlan(Stage.LATE_INTERACTION, li, keep, model=StageModel("bi", "bi", "x")),
        StagePlan(Stage.CROSS_ENCODER, ce, 10, model=StageModel("ce", "ce", "y")),
    ]


def _teach(cascade: Cascade, retrieve: float, li: tuple[float, float], ce: tuple[float, float]) -> None:
    for n in (10, 50, 100):
        cascade.budget.costs.observe(Stage.RETRIEVE, "", n, retrieve)
        cascade.budget.costs.observe(Stage.LATE_INTERACTION, "", n, li[0] + li[1] * n)
        for _ in range(20):
            cascade.budget.costs.observe(Stage.CROSS_ENCODER, "ce", n // 5, ce[0] + ce[1] * (n // 5))


def test_the_cross_encoder_gets_what_fits_and_says_so() -> None:
    cascade = _cascade()
    _teach(cascade, retrieve=8.0, li=(1.0, 0.05), ce=(10.0, 1.0))
    plans = _plans(StageMode.BEST_EFFORT, StageMode.BEST_EFFORT)
    head = cascade.budget.plan(plans, 40.0, 100, REPLY_MS)
    assert head.startswith("budget 40 ms")
    late, cross = (p.budget for p in plans)
    assert late is not None and not late.skip
    assert cross is not None and not cross.skip
    # 40 - 3 (reply) - 8 (retrieval) - 6 (late interaction), less the estimates' 2 sd: ~15-23 ms left,
    # so 10 ms + 1 ms per pair (+ 2 sd) leaves room for about 3-13 of the 30 candidates.
    assert 3 <= cross.cut_to <= 13, cross
    assert "of 30 candidates fit" in cross.note


def test_stages_that_cannot_fit_are_skipped_and_required_ones_never() -> None:
    cascade = _cascade()
    _teach(cascade, retrieve=8.0, li=(1.0, 0.05), ce=(10.0, 1.0))
    plans = _plans(StageMode.BEST_EFFORT, StageMode.BEST_EFFORT)
    cascade.budget.plan(plans, 12.0, 100, REPLY_MS)
    late, cross = (p.budget for p in plans)
    assert late is not None and late.skip.startswith("skipped by the latency budget")
    assert cross is not None and cross.skip.startswith("skipped by the latency budget")
    assert "0 of 100 candidates fit" in cross.note or cross.cut_to < MIN_CANDIDATES
    required = _plans(StageMode.REQUIRED, StageMode.REQUIRED)
    cascade.budget.plan(required, 12.0, 100, REPLY_MS)
    assert all(p.budget is not None and not p.budget.skip and not p.budget.cut_to for p in required)
    assert all("REQUIRED" in p.budget.note for p in required if p.budget is not None)


def test_a_generous_budget_cuts_nothing() -> None:
    cascade = _cascade()
    _teach(cascade, retrieve=8.0, li=(1.0, 0.05), ce=(10.0, 1.0))
    plans = _plans(StageMode.BEST_EFFORT, StageMode.BEST_EFFORT)
    cascade.budget.plan(plans, 400.0, 100, REPLY_MS)
    assert all(p.budget is not None and not p.budget.skip and not p.budget.cut_to for p in plans)


@pytest.mark.parametrize("stage", [Stage.LATE_INTERACTION, Stage.CROSS_ENCODER])
def test_a_stage_with_an_unmeasured_or_old_estimate_is_probed_not_skipped_forever(stage: Stage) -> None:
    cascade = _cascade()
    slow = cascade.budget.costs.model(stage, "ce" if stage == Stage.CROSS_ENCODER else "")
    for _ in range(3):  # a pessimistic start: 30 ms fixed
        slow.observe(10, 30.0 + 10)
    late = StageMode.BEST_EFFORT if stage == Stage.LATE_INTERACTION else StageMode.OFF
    plans = _plans(late, StageMode.BEST_EFFORT if late == StageMode.OFF else StageMode.OFF)
    index = 0 if stage == Stage.LATE_INTERACTION else 1

    def planned() -> BudgetPlan:
        cascade.budget.plan(plans, 40.0, 100, REPLY_MS)
        made = plans[index].budget
        assert made is not None
        return made

    probe = planned()
    assert not probe.skip and probe.cut_to == MIN_CANDIDATES and "probing" in probe.note
    for _ in range(5):  # measured enough: the estimate decides again
        slow.observe(10, 40.0)
    assert planned().skip
    # ...until it has not been measured for a while (a loaded machine's costs fall when the load does).
    slow.last_observed -= PROBE_INTERVAL_S + 1
    assert planned().cut_to == MIN_CANDIDATES


def test_a_first_call_that_loads_the_model_does_not_make_a_stage_unaffordable() -> None:
    # The bench's first cross-encoder search (a worker loading its model) left an estimate of 567 ms fixed,
    # sd 1,039 ms, that no 40 ms budget could fit for hundreds of searches.
    model = CostModel(fixed_ms=12.0, per_candidate_ms=1.5)
    prior = model.estimate(30)
    model.observe(30, 3000.0)
    fixed, per, _ = model.fit()
    assert fixed + per * 30 <= OUTLIER_FACTOR * prior  # the observation counted as at most 3x the prior
    assert model.estimate(30) < 300  # a tenth of the call, spread included
    for _ in range(40):  # the stage's real cost: a few dozen searches later the call is forgotten
        model.observe(30, 40.0)
    assert model.estimate(30) < 1.5 * prior


def test_one_slow_call_does_not_make_a_stage_unaffordable() -> None:
    model = CostModel(fixed_ms=10.0, per_candidate_ms=1.0)
    for n in (2, 10, 20) * 10:
        model.observe(n, 10.0 + n)
    before = model.estimate(10)
    model.observe(10, 2000.0)  # e.g. the first call loads the model
    assert model.estimate(10) < 4 * before
    for n in (2, 10, 20) * 10:
        model.observe(n, 10.0 + n)
    assert model.estimate(10) < 1.5 * before


def test_the_reply_is_kept_back_from_the_budget() -> None:
    cascade = _cascade()
    _teach(cascade, retrieve=8.0, li=(1.0, 0.05), ce=(10.0, 1.0))
    plans = _plans(StageMode.BEST_EFFORT, StageMode.BEST_EFFORT)
    cascade.budget.plan(plans, 40.0, 100, REPLY_MS)
    assert plans[0].budget is not None and not plans[0].budget.skip
    # A reply measured at 28 ms (e.g. a loaded machine) leaves late interaction no room: skipped up front.
    slow = _plans(StageMode.BEST_EFFORT, StageMode.BEST_EFFORT)
    head = cascade.budget.plan(slow, 40.0, 100, 28.0)
    assert "reply 28.0 ms kept back" in head
    assert all(p.budget is not None and p.budget.skip for p in slow)
    # The estimate comes from the replies the server measured.
    for _ in range(60):
        cascade.budget.reply.observe(10, 6.0)
    assert 6.0 + BUDGET_REPLY_MARGIN_MS <= cascade.budget.reply_ms(10) < 7.0 + BUDGET_REPLY_MARGIN_MS


def test_a_stage_stopped_again_and_again_is_soon_not_tried() -> None:
    cascade = _cascade()
    plan = _plans(StageMode.OFF, StageMode.BEST_EFFORT)[1]
    cost = cascade.budget.cost(plan)
    for _ in range(10):  # measured at 15 ms for 10 candidates: 2 fit in 16 ms
        cost.observe(10, 15.0)
    assert BudgetPlanner.fit(cost, 16.0, 30).cut_to >= 2
    stopped = StageReport(
        Stage.CROSS_ENCODER, StageStatus.DEGRADED, "no worker answered within 15 ms", 2, 2, 16.0
    )
    stopped.time_limit = TimeLimit.STOPPED
    estimates = []
    for _ in range(4):  # cut at 16 ms each time: its true cost is unknown, but more than that
        cascade.budget.observe(plan, stopped)
        estimates.append(cost.estimate(2))
    assert estimates == sorted(estimates) and estimates[0] > 16.0  # never cheaper, at once too dear
    assert BudgetPlanner.fit(cost, 25.0, 30).skip  # not tried again with 25 ms left
    assert not cost.probe_due()  # nor probed: it was measured just now
