"""Snapshot pacing: a snapshot rewrites the whole index on the writer thread, so one is due after
SIEVE_SNAPSHOT_EVERY_WRITES changed documents or SIEVE_SNAPSHOT_GROWTH of the index, whichever is more, and after
SIEVE_SNAPSHOT_INTERVAL_S or SNAPSHOT_PACE times the last snapshot's duration, whichever is longer.

In the timed test the save is slowed down (the real save, after a sleep) to stand for a large index's;
nothing else is faked but the bi-encoder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.core import collections as collections_module
from server.core.engine import Engine
from server.storage.index import VectorIndex, snapshot_files, snapshot_generation
from sieve_core.types import CollectionSpec, Document
from tests.conftest import make_settings
from tests.fakes import FakeBiEncoder

SLOW_SAVE_S = 0.2


async def _started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings_: object) -> Engine:
    settings = make_settings(
        tmp_path / "data", models_dir=tmp_path / "models", default_embedding_model="fake", **settings_
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    real_save = VectorIndex.save

    def slow_save(self: VectorIndex, directory: Path, generation: int) -> Path:
        time.sleep(SLOW_SAVE_S)
        return real_save(self, directory, generation)

    monkeypatch.setattr(VectorIndex, "save", slow_save)
    engine = Engine(settings)
    engine.models.add("fake", FakeBiEncoder())
    await engine.start()
    await engine.create_collection(CollectionSpec("c"))
    return engine


# Every write due by its count; the interval short: only the last snapshot's duration can hold one back.
BY_TIME = {"snapshot_every_writes": 10**6, "snapshot_interval_s": 0.05}


@pytest.fixture
async def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Engine]:
    engine = await _started(tmp_path, monkeypatch, **BY_TIME)
    yield engine
    await engine.close()


def _docs(start: int, count: int) -> list[Document]:
    return [Document(f"d{i}", f"document number {i}", {}) for i in range(start, start + count)]


def _snapshot_at(engine: Engine) -> int:
    [path] = snapshot_files(engine.collections.find("c").directory)
    return snapshot_generation(path)


async def test_the_count_that_makes_a_snapshot_due_grows_with_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await _started(tmp_path, monkeypatch, snapshot_every_writes=1, snapshot_interval_s=3600)
    try:
        first = await engine.upsert("c", _docs(0, 100))
        assert _snapshot_at(engine) == first.generation
        # 5 changed documents: over SIEVE_SNAPSHOT_EVERY_WRITES (1) but under a tenth of the 105-vector index.
        await engine.upsert("c", _docs(100, 5))
        assert _snapshot_at(engine) == first.generation
        assert engine.settings.snapshot_growth * 105 > 5
        # 15 changed since the snapshot, a tenth of the index is 11.5: due.
        third = await engine.upsert("c", _docs(105, 10))
        assert _snapshot_at(engine) == third.generation
    finally:
        await engine.close()


async def test_a_slow_snapshot_holds_the_next_one_back_for_pace_times_as_long(engine: Engine) -> None:
    await asyncio.sleep(0.1)  # past the interval
    first = await engine.upsert("c", [Document("a", "the owl hunts at night", {})])
    assert _snapshot_at(engine) == first.generation  # the interval passed, nothing to pace yet
    col = engine.collections.find("c")
    assert col.snapshot_took_s >= SLOW_SAVE_S
    held_until = col.last_snapshot + collections_module.SNAPSHOT_PACE * col.snapshot_took_s

    second = await engine.upsert("c", [Document("b", "green tea in the morning", {})])
    assert time.monotonic() < held_until, "the test's writes were too slow to see the pacing"
    assert _snapshot_at(engine) == first.generation, "the interval passed, but it came sooner than its pace"
    assert col.unsnapshotted_writes == 1

    await asyncio.sleep(max(0.0, held_until - time.monotonic()) + 0.05)
    third = await engine.upsert("c", [Document("c", "a ship leaves the harbour", {})])
    assert third.generation > second.generation
    assert _snapshot_at(engine) == third.generation
    assert col.unsnapshotted_writes == 0


async def test_shutdown_snapshots_whatever_the_pace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await _started(tmp_path, monkeypatch, **BY_TIME)
    await asyncio.sleep(0.1)
    await engine.upsert("c", [Document("a", "the owl hunts at night", {})])
    last = await engine.upsert("c", [Document("b", "green tea in the morning", {})])
    assert _snapshot_at(engine) < last.generation  # held back by the pace
    await engine.close()
    assert _snapshot_at(engine) == last.generation
