"""The core without transport or model files: Engine and JobManager built directly, with a fake runner.

What is checked here: a write is searchable at once; a Search is validated once, in full, before any wait
(min_generation included); jobs see the engine only through its narrow interface and run in-process.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.core.engine import Engine
from server.core.indexing import IndexingEngine
from server.jobs.job_store import SUCCEEDED
from server.jobs.manager import JobManager
from sieve_core.errors import FailedPrecondition, InvalidArgument
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT
from sieve_core.types import (
    CollectionSpec,
    Document,
    SearchQuery,
    SearchSettings,
    StageMode,
    StageStatus,
    TokenStorageSpec,
)
from tests.conftest import make_settings
from tests.fakes import FakeBiEncoder

DOCS = [
    Document("owl", "the owl hunts at night", {"kind": "bird"}),
    Document("tea", "green tea in the morning", {"kind": "drink"}),
    Document("ship", "a ship leaves the harbour", {"kind": "thing"}),
]
WAIT_S = 1.0


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    settings = make_settings(
        tmp_path / "data",
        models_dir=tmp_path / "models",
        default_embedding_model="fake",
        min_generation_wait_s=WAIT_S,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine(settings)
    fake = FakeBiEncoder()
    engine.models.add("fake", fake)
    assert fake.warmed
    await engine.start()
    await engine.create_collection(CollectionSpec("c"))
    yield engine
    await engine.close()


async def test_a_write_is_searchable_at_once(engine: Engine) -> None:
    written = await engine.upsert("c", DOCS)
    result = await engine.search(SearchQuery("c", "owl at night", top_k=1, min_generation=written.generation))
    assert [h.id for h in result.hits] == ["owl"] and result.hits[0].metadata == {"kind": "bird"}
    assert result.generation == written.generation
    assert [s.status for s in result.stages] == [
        StageStatus.COMPLETED,
        StageStatus.SKIPPED,
        StageStatus.SKIPPED,
    ]
    deleted = await engine.delete_documents("c", ["owl", "nope"])
    assert (deleted.count, deleted.not_found) == (1, 1)
    result = await engine.search(SearchQuery("c", "owl at night", top_k=3))
    assert "owl" not in [h.id for h in result.hits] and result.generation == deleted.generation


async def test_min_generation_waits_then_refuses(engine: Engine) -> None:
    written = await engine.upsert("c", DOCS)
    started = time.monotonic()
    with pytest.raises(
        FailedPrecondition, match=f"below the requested min_generation {written.generation + 1}"
    ):
        await engine.search(SearchQuery("c", "owl", min_generation=written.generation + 1))
    assert time.monotonic() - started >= WAIT_S * 0.9
    # The caller's deadline caps the wait.
    started = time.monotonic()
    with pytest.raises(FailedPrecondition):
        await engine.search(SearchQuery("c", "owl", min_generation=written.generation + 1), timeout_s=0.3)
    assert time.monotonic() - started < WAIT_S * 0.9


@pytest.mark.parametrize(
    ("query", "error", "message"),
    [
        (SearchQuery("c", "owl", min_generation=-1), InvalidArgument, "min_generation must be 0 or more"),
        (SearchQuery("c", "  ", min_generation=99), InvalidArgument, "query is empty"),
        (SearchQuery("c/..", "owl", min_generation=99), InvalidArgument, "invalid collection name"),
        (SearchQuery("c", "owl", top_k=10_000, min_generation=99), InvalidArgument, "top_k must be between"),
        (
            SearchQuery(
                "c", "owl", min_generation=99, settings=SearchSettings(cross_encoder=StageMode.REQUIRED)
            ),
            FailedPrecondition,
            "no cross_encoder model is configured",
        ),
    ],
)
async def test_a_bad_search_fails_before_any_wait(
    engine: Engine, query: SearchQuery, error: type[Exception], message: str
) -> None:
    started = time.monotonic()
    with pytest.raises(error, match=message):
        await engine.search(query)
    assert time.monotonic() - started < WAIT_S / 2


async def test_index_target_says_whether_jobs_store_token_vectors(engine: Engine) -> None:
    plain = await engine.index_target("c")
    assert (plain.info.embedding_model, plain.token_format) == ("fake", None)
    late = SearchSettings(late_interaction=StageMode.BEST_EFFORT)
    await engine.create_collection(CollectionSpec("late", defaults=late))
    target = await engine.index_target("late")
    # Zero-shot: the default format, from the bi-encoder's own pass (no separate token model).
    assert (target.token_format, target.token_model) == (DEFAULT_TOKEN_FORMAT, None)


async def test_a_job_runs_in_process_through_the_narrow_interface(engine: Engine, tmp_path: Path) -> None:
    narrow: IndexingEngine = engine  # what JobManager is given; mypy checks the engine satisfies it
    jobs = JobManager(narrow, engine.settings)
    await jobs.start()
    source = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": d.id, "text": d.text}) for d in DOCS]
    source.write_text("\n".join([*lines[:2], "{not json", lines[2]]) + "\n")
    try:
        started = await jobs.start_file_job("c", str(source), 0, 2)
        views = [view async for view in jobs.watch(started.record.id, 50)]
    finally:
        await jobs.stop()
    record = views[-1].record
    assert (record.state, record.embedder, record.done, record.failed) == (SUCCEEDED, "in-process", 3, 1)
    found, missing = await engine.get_documents("c", ["owl", "tea", "ship", "nope"])
    assert [d.id for d in found] == ["owl", "tea", "ship"] and missing == ["nope"]
    result = await engine.search(SearchQuery("c", "ship harbour", top_k=1, min_generation=record.generation))
    assert [h.id for h in result.hits] == ["ship"]


async def test_a_streamed_search_ends_with_the_search_and_its_evidence(engine: Engine) -> None:
    late = SearchSettings(late_interaction=StageMode.BEST_EFFORT)
    # Unpooled, so that each stored row is one word (pooled rows stand for clusters of words).
    await engine.create_collection(
        CollectionSpec("late", defaults=late, token_storage=TokenStorageSpec(pool_factor=1))
    )
    await engine.upsert("late", DOCS)
    query = SearchQuery("late", "owl at night", top_k=2)
    updates = [u async for u in engine.search_stream(query)]
    assert [(u.stage.name, u.final) for u in updates] == [("RETRIEVE", False), ("LATE_INTERACTION", True)]
    assert not updates[0].result.hits[0].evidence  # retrieval finds no evidence
    answer = await engine.search(query)
    final = updates[-1].result
    assert [(h.id, h.score, h.evidence) for h in final.hits] == [
        (h.id, h.score, h.evidence) for h in answer.hits
    ]
    top = answer.hits[0]
    # The fake's tokens are words: "owl", then "at night" (adjacent words, one span).
    assert top.id == "owl" and [top.text[s.start : s.end] for s in top.evidence] == ["owl", "at night"]


async def test_another_servers_collection_this_one_cannot_take_in_is_warned_about_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A collection on a shared store whose model this server lacks: the follower tries it at every change,
    but the log says so once per reason, not every second."""
    engine.store.create_collection("elsewhere", "a-model-not-here", "a-model-not-here@1", "cosine", 4, "{}")
    with caplog.at_level("WARNING", logger="server.core.collections"):
        for _ in range(3):
            engine.collections.sync(engine.store.list_collections())
    warned = [r for r in caplog.records if "'elsewhere' written by another server: not taken in" in r.message]
    assert len(warned) == 1, [r.message for r in caplog.records]
    assert engine.collections.get("c").row.name == "c"  # the others are still in
