"""Faults during a re-rank on a worker, through `Search`, with a real worker process and a real redis-server.

The re-rank that runs on the workers is the cross-encoder's (zero-shot late interaction runs in the server
from its token store since issue 13, and a ColBERT bundle's worker task only encodes the query), so these
faults are driven through the cross-encoder stage, with the seeded cross-encoder checkpoint exported here.

- The worker's pool process is SIGKILLed mid-task: with time left, the task is redelivered to the
  respawned process and the search completes; with too little time, the search answers within its
  deadline in retrieval order, marked degraded (and UNAVAILABLE when the stage is REQUIRED).
- Redis is stopped mid-flight: the search answers within its deadline, degraded; once Redis is back on
  its port, server and worker recover without being restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from sieve_core.contracts import Candidate, CrossEncoderRequest
from sieve_core.tasking import TASK_CROSS_ENCODER, SieveCelery
from tests.conftest import (
    SEEDED_CROSS_ENCODER,
    RedisServer,
    Worker,
    make_settings,
    start_api,
    start_worker,
    stop_api,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

WORDS = [
    "protein",
    "cell",
    "gene",
    "expression",
    "tumour",
    "patient",
    "cohort",
    "trial",
    "dose",
    "placebo",
    "risk",
    "receptor",
    "pathway",
    "mutation",
    "enzyme",
    "infection",
    "immune",
    "response",
    "vaccine",
    "insulin",
    "glucose",
    "neuron",
    "cortex",
    "memory",
    "sleep",
    "bacteria",
    "antibiotic",
    "resistance",
    "inflammation",
    "cytokine",
    "signalling",
    "mitochondria",
    "metabolism",
]
DOCS = 100
QUERY = "immune response to infection in a patient cohort"
CROSS = SEEDED_CROSS_ENCODER


@pytest.fixture(scope="module")
def models_dir(seeded_models: Path) -> Path:
    """The bi-encoder and the seeded cross-encoder (tests/conftest.py, exported once per session)."""
    return seeded_models


@pytest.fixture(scope="module")
def worker(  # type: ignore[no-untyped-def]
    models_dir: Path, redis_url: str, client_app, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """A cross-encoder worker (overrides conftest's embed/colbert worker for this module)."""
    running = start_worker(
        redis_url,
        client_app,
        tmp_path_factory.mktemp("cross-worker") / "worker.log",
        queues="cross_encoder",
        models_dir=models_dir,
        extra_env={"SIEVE_CROSS_ENCODER_MODEL": CROSS},
        name="faults",
    )
    try:
        yield running
    finally:
        running.kill()


def _corpus(seed: str) -> dict[str, str]:
    # Long, unique texts: their pair scores are cached nowhere yet, so a re-rank has real work to do.
    rng = random.Random(seed)
    return {f"d{i}": f"{seed} " + " ".join(rng.choices(WORDS, k=180)) for i in range(DOCS)}


def _settings(mode: int) -> common_pb2.SearchSettings:
    return common_pb2.SearchSettings(cross_encoder=mode, retrieve_candidates=DOCS, cross_encoder_keep=10)


def _server(models_dir: Path, tmp_path: Path, redis_url: str, rerank_timeout_s: float):  # type: ignore[no-untyped-def]
    return make_settings(
        tmp_path,
        redis_url=redis_url,
        models_dir=models_dir,
        cross_encoder_model=CROSS,
        rerank_timeout_s=rerank_timeout_s,
    )


async def _collection(api) -> str:  # type: ignore[no-untyped-def]
    name = f"faults-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
    )
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name,
            documents=[documents_pb2.Document(id=i, text=t) for i, t in _corpus(name).items()],
        )
    )
    return name


async def _wait_task_started(redis_url: str, limit_s: float = 20.0) -> None:
    """Until some re-rank task is STARTED on a worker (task_track_started writes that state)."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for key in client.scan_iter("celery-task-meta-*"):
            raw = client.get(key)
            if raw and json.loads(raw).get("status") == "STARTED":
                client.delete(key)  # so the next wait sees the next task
                return
        await asyncio.sleep(0.02)
    raise AssertionError("no task started on the worker")


async def _wait_pool_ready(app: SieveCelery) -> None:
    """Until a respawned pool process has warmed its runners and runs tasks again: a small task with no
    expiry, waited for off the event loop (a re-rank sent with a 1.5 s expiry while the new process is
    still loading its models would expire unstarted on a loaded machine)."""
    request = CrossEncoderRequest(query=QUERY, model=CROSS, candidates=[Candidate.of("warm-up text")])
    result = app.send_task(TASK_CROSS_ENCODER, args=[request.to_json()])
    await asyncio.to_thread(result.get, timeout=120)


def _kill_pool(worker: Worker) -> None:
    pids = worker.pool_pids()
    assert pids, "the worker has no pool process"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


async def test_worker_killed_mid_rerank_with_time_left_completes(
    worker: Worker, models_dir: Path, redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(_server(models_dir, tmp_path, redis_url, 40.0))
    try:
        name = await _collection(api)
        started = time.monotonic()
        search = asyncio.ensure_future(
            api.search.Search(
                search_pb2.SearchRequest(
                    collection=name, query=QUERY, settings=_settings(common_pb2.STAGE_MODE_BEST_EFFORT)
                ),
                timeout=50,
            )
        )
        await _wait_task_started(redis_url)
        _kill_pool(worker)
        resp = await search
        cross = resp.stages[2]
        # Redelivered to the respawned pool process (task_retry_on_worker_lost) and finished in time.
        assert cross.status == search_pb2.STAGE_STATUS_COMPLETED, cross.reason
        # Every retrieved candidate was re-ranked (HNSW may return a few fewer than all 100 documents).
        assert cross.candidates_in == resp.stages[0].candidates_out >= DOCS - 5 and "computed" in cross.method
        assert time.monotonic() - started < 50
        assert "WorkerLostError" in worker.tail() or "exited prematurely" in worker.tail()
    finally:
        await stop_api(api)


async def test_worker_killed_mid_rerank_without_time_left_degrades_within_the_deadline(
    worker: Worker, models_dir: Path, redis_url: str, client_app: SieveCelery, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(_server(models_dir, tmp_path, redis_url, 1.5))
    try:
        for mode in (common_pb2.STAGE_MODE_BEST_EFFORT, common_pb2.STAGE_MODE_REQUIRED):
            # A fresh collection and query each round: a redelivered task of the previous round may have
            # cached its pair scores, and a re-rank that finishes before the kill proves nothing.
            name = await _collection(api)
            query = f"{QUERY} {mode}"
            request = search_pb2.SearchRequest(collection=name, query=query, settings=_settings(mode))
            started = time.monotonic()
            search = asyncio.ensure_future(api.search.Search(request, timeout=10))
            await _wait_task_started(redis_url)
            _kill_pool(worker)
            if mode == common_pb2.STAGE_MODE_REQUIRED:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await search
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "cross_encoder is required" in err.value.details()
            else:
                resp = await search
                cross = resp.stages[2]
                assert cross.status == search_pb2.STAGE_STATUS_DEGRADED
                assert "no worker answered within 1500 ms" in cross.reason
                # Retrieval order kept: the hits carry the retrieval score only.
                assert len(resp.hits) == 10 and all(len(h.stage_scores) == 1 for h in resp.hits)
            assert (
                time.monotonic() - started < 4.0
            )  # the 1.5 s budget plus slack, well inside the 10 s deadline
            # The next round needs a pool process that is up and warm again.
            await _wait_pool_ready(client_app)
    finally:
        await stop_api(api)


async def test_redis_stopped_mid_flight_degrades_then_recovers(
    redis_server: RedisServer, worker: Worker, models_dir: Path, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(_server(models_dir, tmp_path, redis_server.url, 5.0))
    try:
        name = await _collection(api)
        request = search_pb2.SearchRequest(
            collection=name, query=QUERY, settings=_settings(common_pb2.STAGE_MODE_BEST_EFFORT)
        )
        started = time.monotonic()
        search = asyncio.ensure_future(api.search.Search(request, timeout=8))
        await _wait_task_started(redis_server.url)
        redis_server.stop()
        resp = await search
        assert time.monotonic() - started < 8
        assert resp.stages[2].status == search_pb2.STAGE_STATUS_DEGRADED, resp.stages[2]
        assert len(resp.hits) == 10

        # While Redis is down: still answered, quickly (the caches are skipped, the stage degrades).
        started = time.monotonic()
        down = await api.search.Search(request, timeout=8)
        assert down.stages[2].status == search_pb2.STAGE_STATUS_DEGRADED
        assert "Redis" in down.stages[2].reason or "broker" in down.stages[2].reason
        assert time.monotonic() - started < 3

        # Redis back on the same port: neither the server nor the worker is restarted, yet re-ranking
        # works again once both have reconnected.
        redis_server.start()
        deadline = time.monotonic() + 60
        status, reason = None, ""
        while time.monotonic() < deadline:
            again = await api.search.Search(request, timeout=15)
            status, reason = again.stages[2].status, again.stages[2].reason
            if status == search_pb2.STAGE_STATUS_COMPLETED:
                break
            await asyncio.sleep(0.5)
        assert status == search_pb2.STAGE_STATUS_COMPLETED, f"no recovery after Redis came back: {reason}"
        assert worker.proc.poll() is None
    finally:
        await stop_api(api)
