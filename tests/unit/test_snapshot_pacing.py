"""Snapshot pacing: a snapshot is written when enough documents changed, but never sooner after the previous
one than SNAPSHOT_PACE times as long as that one took (a large index's snapshot holds up the writer thread;
at a fixed count a bulk load would spend most of its time rewriting ever larger snapshots).

The save is slowed down here (the real save, after a sleep) to stand for a large index's; nothing else is
faked but the bi-encoder."""

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


async def _started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    settings = make_settings(
        tmp_path / "data",
        models_dir=tmp_path / "models",
        default_embedding_model="fake",
        snapshot_every_writes=1,  # every write is due: only the pacing can hold one back
        snapshot_interval_s=3600,
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


@pytest.fixture
async def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Engine]:
    engine = await _started(tmp_path, monkeypatch)
    yield engine
    await engine.close()


def _snapshot_at(engine: Engine) -> int:
    [path] = snapshot_files(engine.collections.find("c").directory)
    return snapshot_generation(path)


async def test_a_slow_snapshot_holds_the_next_one_back_for_pace_times_as_long(engine: Engine) -> None:
    first = await engine.upsert("c", [Document("a", "the owl hunts at night", {})])
    assert _snapshot_at(engine) == first.generation  # the first write of a collection: nothing to pace yet
    col = engine.collections.find("c")
    assert col.snapshot_took_s >= SLOW_SAVE_S
    held_until = col.last_snapshot + collections_module.SNAPSHOT_PACE * col.snapshot_took_s

    second = await engine.upsert("c", [Document("b", "green tea in the morning", {})])
    assert time.monotonic() < held_until, "the test's writes were too slow to see the pacing"
    assert _snapshot_at(engine) == first.generation, "due by count, but written sooner than its pace allows"
    assert col.unsnapshotted_writes == 1

    await asyncio.sleep(max(0.0, held_until - time.monotonic()) + 0.05)
    third = await engine.upsert("c", [Document("c", "a ship leaves the harbour", {})])
    assert third.generation > second.generation
    assert _snapshot_at(engine) == third.generation
    assert col.unsnapshotted_writes == 0


async def test_shutdown_snapshots_whatever_the_pace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await _started(tmp_path, monkeypatch)
    await engine.upsert("c", [Document("a", "the owl hunts at night", {})])
    last = await engine.upsert("c", [Document("b", "green tea in the morning", {})])
    assert _snapshot_at(engine) < last.generation  # held back by the pace
    await engine.close()
    assert _snapshot_at(engine) == last.generation
