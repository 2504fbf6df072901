"""A search's re-ranking plan: each stage's model resolved once, up front; REQUIRED without a model fails
before any work, BEST_EFFORT degrades with the reason; and the one answer to "does this collection
re-rank by late interaction?". No processes: a registry over manifest-only bundles, no Redis."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.core.cascade import Cascade
from server.core.collection_state import server_defaults, token_model
from server.core.tokens import TokenPlan, TokenStage, plan_from
from server.dispatch.dispatcher import Dispatcher
from server.storage.records import CollectionRow
from server.storage.store import SqliteStore
from sieve_core.cache import ResultCache
from sieve_core.errors import FailedPrecondition
from sieve_core.models.registry import ModelRegistry
from sieve_core.token_format import TokenFormat
from sieve_core.types import Hit, SearchSettings, Stage, StageMode, StageReport, StageStatus
from tests.conftest import make_settings
from tests.unit.test_model_registry import fake_bundle

OFF, BEST, REQ = StageMode.OFF, StageMode.BEST_EFFORT, StageMode.REQUIRED


@pytest.fixture
def cascade(tmp_path: Path):  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    fake_bundle(models, "bi", "bi_encoder")
    fake_bundle(models, "col", "colbert")
    fake_bundle(models, "ce", "cross_encoder")
    settings = make_settings(tmp_path / "data", models_dir=models)
    assert settings.redis_url is None
    pool = ThreadPoolExecutor(2)
    dispatcher = Dispatcher(settings)
    cache = ResultCache.from_settings(settings)
    store = SqliteStore(tmp_path / "data" / "sieve.db")

    async def read(fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    token_stage = TokenStage(settings, store, dispatcher, cache, read)
    yield Cascade(settings, ModelRegistry(models), dispatcher, cache, pool, token_stage)
    dispatcher.close()
    pool.shutdown()


def _tokens(cascade: Cascade, model: str, *, zero_shot: bool) -> TokenPlan:
    """How a collection created with late interaction of `model` stores its token vectors."""
    row = CollectionRow(
        1, "c", "bi", "bi@r1", "cosine", 8, "{}", 0, 0, 0.0, json.dumps(TokenFormat().to_json())
    )
    plan = plan_from(row, model, cascade.models.manifest(model), zero_shot)
    assert plan is not None
    return plan


def _settings(**kw: object) -> SearchSettings:
    base = {"late_interaction": OFF, "cross_encoder": OFF}
    return SearchSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_stages_resolve_their_models(cascade: Cascade) -> None:
    plans = cascade.plan(
        _settings(
            late_interaction=REQ, late_interaction_model="col", cross_encoder=BEST, cross_encoder_model="ce"
        ),
        "bi",
        10,
        tokens=_tokens(cascade, "col", zero_shot=False),
    )
    assert [(p.stage, p.model and p.model.name, p.unavailable) for p in plans] == [
        (Stage.LATE_INTERACTION, "col", ""),
        (Stage.CROSS_ENCODER, "ce", ""),
    ]
    assert "ColBERT" in plans[0].model.label  # type: ignore[union-attr]
    # No late-interaction bundle: MaxSim over the collection's own bi-encoder.
    (zero_shot, _) = cascade.plan(
        _settings(late_interaction=REQ), "bi", 10, tokens=_tokens(cascade, "bi", zero_shot=True)
    )
    assert (
        zero_shot.model is not None and zero_shot.model.name == "bi" and "zero-shot" in zero_shot.model.label
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (_settings(late_interaction=REQ), "stores no token vectors"),
        (
            _settings(late_interaction=REQ, late_interaction_model="missing"),
            "stores the token vectors of 'col', not of 'missing'",
        ),
        (_settings(cross_encoder=REQ), "no cross_encoder model is configured"),
        (
            _settings(cross_encoder=REQ, cross_encoder_model="col"),
            "'colbert' bundle; cross-encoder re-ranking needs",
        ),
    ],
)
def test_a_required_stage_without_its_model_fails_up_front(
    cascade: Cascade, settings: SearchSettings, message: str
) -> None:
    # A collection that stores ColBERT token vectors, unless the case asks for none.
    tokens = None if message == "stores no token vectors" else _tokens(cascade, "col", zero_shot=False)
    with pytest.raises(FailedPrecondition, match=message):
        cascade.plan(settings, "bi", 10, tokens=tokens)


def test_a_best_effort_stage_without_its_model_degrades_and_keeps_the_order(cascade: Cascade) -> None:
    plans = cascade.plan(_settings(late_interaction=BEST, late_interaction_model="missing"), "bi", 2)
    assert plans[0].model is None and "stores no token vectors" in plans[0].unavailable
    hits = [Hit("a", 0.9), Hit("b", 0.8), Hit("c", 0.7)]

    async def run() -> tuple[list[Hit], list[StageReport]]:
        reports, ranked = [], hits
        stages = cascade.run(
            plans, collection_id=1, generation=1, query="q", hits=hits, top_k=2, deadline=None
        )
        async for _, after, report in stages:
            ranked = after  # each stage's ranking; the last one's is the answer
            reports.append(report)
        return ranked, reports

    ranked, reports = asyncio.run(run())
    assert [h.id for h in ranked] == ["a", "b", "c"]
    assert [(r.stage, r.status) for r in reports] == [
        (Stage.LATE_INTERACTION, StageStatus.DEGRADED),
        (Stage.CROSS_ENCODER, StageStatus.SKIPPED),
    ]
    assert reports[0].reason.endswith("; kept the previous order") and "no token vectors" in reports[0].reason


@pytest.mark.parametrize(
    ("defaults", "server_model", "expected"),
    [
        (SearchSettings(), None, "bi"),  # zero-shot: the collection's own bi-encoder
        (SearchSettings(late_interaction=OFF, late_interaction_model="col"), None, "col"),
        (SearchSettings(late_interaction=BEST), "srv", "srv"),  # the server's SIEVE_LATE_INTERACTION_MODEL
        (SearchSettings(late_interaction=REQ, late_interaction_model="col"), "srv", "col"),  # collection wins
    ],
)
def test_which_model_a_collection_stores_token_vectors_of(
    defaults: SearchSettings, server_model: str | None, expected: str
) -> None:
    base = server_defaults(make_settings(Path("/nonexistent"), late_interaction_model=server_model))
    assert token_model(defaults, base, "bi") == expected
