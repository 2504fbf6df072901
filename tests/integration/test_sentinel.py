"""Redis Sentinel for the broker, the result backend and the caches, through a primary switch.

Real processes: a redis-server primary and its replica (both with a password), three Sentinels (`redis-server
CONF --sentinel`, with their own password), a `sieve serve` and a cross-encoder `celery worker`, both told
only SIEVE_REDIS_URL=redis://:PASSWORD@sieve-primary/0 and SIEVE_REDIS_SENTINELS (sieve_cli/sentinel.py).
Searches re-rank with the cross-encoder on the worker (broker and result backend) and cache the pair
scores in Redis (the server's cache client); then the primary is killed with SIGKILL (the Sentinels
promote the replica) and, once it is back as a replica, switched back with SENTINEL FAILOVER. Through each
switch every search is answered; the re-ranking stage may only degrade the documented way (DEGRADED, with a
reason, previous order kept) and must run on the worker again, against the new primary, within
SWITCH_BUDGET_S. Then the same connections with TLS everywhere, through a failover (without a Sieve stack).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sieve import SieveClient, StageStatus

from sieve_cli import stack
from sieve_cli.sentinel import SentinelGroup
from sieve_cli.stack import RedisTls
from sieve_core import redis_conn
from sieve_core.config import load_settings
from sieve_core.tasking import client_app
from tests.certs import make_certs
from tests.conftest import SEEDED_CROSS_ENCODER, Worker, start_worker
from workers.celery_app import create_app

PASSWORD = f"pw-{uuid.uuid4().hex}"
SENTINEL_PASSWORD = f"spw-{uuid.uuid4().hex}"
# From the switch to the first search re-ranked on the worker again. Measured here: a few seconds (the
# Sentinels need DOWN_AFTER_MS = 1 s to call a killed primary down, then elect and promote; the worker's
# consumer reconnects with Celery's backoff); the budget leaves room for a loaded 2-core machine.
SWITCH_BUDGET_S = 30.0
DOCS = {
    "aspirin": "Aspirin lowers the chance of a heart attack in people with heart disease.",
    "statins": "Statins reduce cholesterol and the number of cardiovascular events.",
    "sleep": "Short sleep is linked to worse memory consolidation in students.",
    "malaria": "Bed nets treated with insecticide cut malaria cases in children.",
    "gut": "The gut microbiome changes with diet within days.",
}
QUERY = "does aspirin prevent heart attacks"
RERANK = {"top_k": 3, "cross_encoder": "best_effort", "retrieve_candidates": 6, "cross_encoder_keep": 3}


@dataclass
class Stack:
    group: SentinelGroup
    client: SieveClient
    collection: str
    worker: Worker
    server: stack.SieveProcess


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    try:
        running = SentinelGroup(
            tmp_path_factory.mktemp("sentinel"), password=PASSWORD, sentinel_password=SENTINEL_PASSWORD
        )
    except stack.RedisUnavailable as exc:
        pytest.skip(str(exc))
    with running:
        yield running


@pytest.fixture(scope="module")
def sieve(
    group: SentinelGroup, seeded_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("sentinel-stack")
    env = {**group.settings(), "SIEVE_CROSS_ENCODER_MODEL": SEEDED_CROSS_ENCODER}
    app = create_app(load_settings(env, models_dir=seeded_models))  # answers the worker's readiness ping
    worker = start_worker(
        group.url,
        app,
        work / "worker.log",
        queues="cross_encoder",
        models_dir=seeded_models,
        extra_env=env,
        name="sentinel",
    )
    server_env = {**env, "SIEVE_RERANK_TIMEOUT_S": "5"}
    with (
        worker,
        stack.sieve_process(
            "serve",
            data_dir=work / "data",
            settings=server_env,
            models_dir=seeded_models,
            log=work / "server.log",
        ) as server,
        SieveClient(server.address) as client,
    ):
        name = f"sentinel-{uuid.uuid4().hex[:8]}"
        client.create_collection(name)
        client.upsert_documents(name, [{"id": i, "text": t} for i, t in DOCS.items()])
        yield Stack(group, client, name, worker, server)


def _rerank_stage(sieve: Stack, query: str):  # type: ignore[no-untyped-def]
    response = sieve.client.search(sieve.collection, query, timeout=15, **RERANK)  # type: ignore[arg-type]
    assert len(response.hits) == 3, response
    return response.stages[-1]


def _through_a_switch(sieve: Stack, switch_at: float) -> tuple[float, int]:
    """Searches (a new query each, so none is answered from the cache) until one is re-ranked on the worker;
    every one must be answered, its stage COMPLETED or DEGRADED with a reason. Seconds from `switch_at` to
    that search, and how many searches were degraded on the way."""
    degraded = 0
    while True:
        stage = _rerank_stage(sieve, f"{QUERY} {uuid.uuid4().hex[:8]}")
        if stage.status == StageStatus.STAGE_STATUS_COMPLETED and stage.method.startswith("worker"):
            return time.monotonic() - switch_at, degraded
        assert stage.status == StageStatus.STAGE_STATUS_DEGRADED and stage.reason, stage
        assert PASSWORD not in stage.reason and SENTINEL_PASSWORD not in stage.reason
        degraded += 1
        assert time.monotonic() - switch_at < SWITCH_BUDGET_S, (
            f"not re-ranked on the worker {SWITCH_BUDGET_S:.0f}s after the switch: {stage.reason}\n"
            f"--- worker ---\n{sieve.worker.tail()}\n--- server ---\n{sieve.server.log_tail()}"
        )
        time.sleep(0.2)


def _cached_on_the_primary(sieve: Stack, query: str) -> None:
    """The same search twice: the second takes the pair scores from the cache, on the current primary."""
    stage = _rerank_stage(sieve, query)
    assert stage.status == StageStatus.STAGE_STATUS_COMPLETED, stage
    again = _rerank_stage(sieve, query)
    assert (again.status, again.method) == (StageStatus.STAGE_STATUS_COMPLETED, "cache"), again
    port = sieve.group.primary_port()
    assert port is not None
    primary = sieve.group.node(port).client()
    assert primary.info("replication")["role"] == "master"
    assert any(b"scores" in key for key in primary.scan_iter(count=1000)), "no cached scores on the primary"


def test_searches_rerank_on_the_worker_and_cache_through_the_sentinels(sieve: Stack) -> None:
    stage = _rerank_stage(sieve, QUERY)
    assert stage.status == StageStatus.STAGE_STATUS_COMPLETED, stage
    assert stage.method.startswith("worker"), stage.method
    _cached_on_the_primary(sieve, f"{QUERY} cached")


def test_kill_9_of_the_primary_then_sentinel_failover_back(sieve: Stack) -> None:
    group = sieve.group
    first = group.primary.port
    assert group.primary_port() == first

    killed_at = time.monotonic()
    group.primary.stop()  # SIGKILL
    took, degraded = _through_a_switch(sieve, killed_at)
    assert group.primary_port() == group.replica.port
    print(f"kill -9 of the primary: re-ranked on the worker again after {took:.1f}s ({degraded} degraded)")
    _cached_on_the_primary(sieve, f"{QUERY} after kill")

    # The old primary comes back empty on its port; the Sentinels make it a replica of the new primary.
    group.primary.start()
    _wait_replica_in_sync(group, group.primary.client())
    switched_at = time.monotonic()
    group.sentinels[0].client().sentinel_failover(group.master)
    group.wait_for_primary_other_than(group.replica.port)
    took, degraded = _through_a_switch(sieve, switched_at)
    assert group.primary_port() == first
    print(f"SENTINEL FAILOVER: re-ranked on the worker again after {took:.1f}s ({degraded} degraded)")
    _cached_on_the_primary(sieve, f"{QUERY} after failover")
    assert sieve.worker.proc.poll() is None and sieve.server.proc.poll() is None


def _wait_replica_in_sync(group: SentinelGroup, replica: redis.Redis, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = replica.info("replication")
            known = group.sentinels[0].client().sentinel_master(group.master)
            if info.get("role") == "slave" and info.get("master_link_status") == "up" and known["num-slaves"]:
                return
        except redis.RedisError:
            pass
        time.sleep(0.2)
    raise AssertionError("the restarted primary did not become an in-sync replica")


def test_tls_everywhere_for_redis_py_celery_and_kombu_through_a_failover(tmp_path: Path) -> None:
    """A TLS-only group (primary, replica and Sentinels speak only TLS, replication and the Sentinels' own
    connections included): SIEVE_REDIS_URL=rediss://... with SIEVE_REDIS_TLS_CA_FILE reaches it through the
    Sentinels from redis-py, Celery's result backend and kombu's broker channel, before and after the
    primary is killed."""
    certs = make_certs(tmp_path)
    tls = RedisTls(ca=certs.ca, cert=certs.server_cert, key=certs.server_key)
    try:
        group = SentinelGroup(
            tmp_path / "redis", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD, tls=tls
        )
    except stack.RedisUnavailable as exc:
        pytest.skip(str(exc))
    with group:
        settings = load_settings(group.settings())
        client = redis_conn.client(settings, timeout_s=1)
        app = client_app(settings)

        def round_trip(tag: str) -> None:
            client.set(f"k-{tag}", tag)
            assert client.get(f"k-{tag}") == tag.encode()
            app.backend.set(f"b-{tag}", tag)
            assert app.backend.get(f"b-{tag}") == tag.encode()
            with app.connection_for_write() as conn:
                queue = conn.SimpleQueue(f"q-{tag}")
                queue.put({"tag": tag})
                message = queue.get(timeout=5)
                assert message.payload == {"tag": tag}
                message.ack()
                queue.close()

        round_trip("before")
        first = group.primary.port
        group.primary.stop()
        group.wait_for_primary_other_than(first)
        deadline = time.monotonic() + SWITCH_BUDGET_S
        while True:
            try:
                round_trip("after")
                break
            except (redis.RedisError, OSError) as exc:
                assert time.monotonic() < deadline, f"no round trip through the new primary: {exc}"
                time.sleep(0.2)
        assert group.node(group.replica.port).client().info("replication")["role"] == "master"
