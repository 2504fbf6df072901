"""Prometheus metrics of one server, served on SIEVE_METRICS_ADDRESS (`/metrics`).

Each server has its own registry (several in-process servers in tests do not clash). Calls, refusals and
search stages are counted as they happen (the front door reports them); queue depths, collection sizes
and jobs are read at scrape time by a collector. The HTTP endpoint runs in its own thread, so what the
collector needs from the event loop it asks for with a short timeout, and what it needs from Redis it
reads with the dispatcher's client (0.5 s socket timeout); either failing leaves those series out of the
scrape (and sets `sieve_redis_up` to 0) rather than holding it up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sieve.v1 import common_pb2, search_pb2

if TYPE_CHECKING:
    from server.core.engine import Engine
    from server.jobs.manager import JobManager

log = logging.getLogger("sieve.server")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
SCRAPE_WAIT_S = 2.0  # the longest a scrape waits for the event loop (a busy loop is not worth more)
JOB_SCAN = 1000  # the jobs a scrape looks at (most recent first; running ones are among them)


def _enum_label(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:  # a value newer than these stubs
        return str(value)


class ServerMetrics:
    """The server's metrics; `observe_*` are called on the event loop (cheap: counters only)."""

    def __init__(self, run_state_file: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if run_state_file is not None:  # started by `sieve run`: its children's restarts
            r.register(_RunStateCollector(run_state_file))
        self.requests = Counter(
            "sieve_requests", "Calls answered, by method and status code.", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "sieve_request_seconds",
            "Time from the call's start to its answer, by method (streams: until they end).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "sieve_inflight_requests",
            "Calls in progress that count toward SIEVE_MAX_INFLIGHT_REQUESTS (WatchJob streams apart).",
            registry=r,
        )
        self.inflight_watches = Gauge("sieve_inflight_watches", "WatchJob streams open.", registry=r)
        self.refused = Counter(
            "sieve_refused",
            "Calls refused before any work with UNAVAILABLE/RESOURCE_EXHAUSTED and a RetryInfo: "
            "reason overload (the in-flight limit), starting or shutting_down.",
            ["reason"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "sieve_stage_seconds",
            "Time a search stage took, from the response's stage reports.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_results = Counter(
            "sieve_stage_results",
            "Search stages by outcome: COMPLETED, DEGRADED (kept the previous order) or SKIPPED (not asked for).",
            ["stage", "status"],
            registry=r,
        )
        self.stage_cache = Counter(
            "sieve_stage_cache_lookups",
            "Re-ranking stages that looked for their scores in the cache: result hit (no worker needed) or "
            "miss. Hit rate: hit / (hit + miss).",
            ["stage", "result"],
            registry=r,
        )
        self.token_reads = Counter(
            "sieve_late_interaction_token_vectors",
            "Candidates' token vectors used by late interaction, by source: store (read from the collection's "
            "store) or pending (none stored yet; ranked after the scored candidates).",
            ["source"],
            registry=r,
        )
        self.token_bytes = Counter(
            "sieve_late_interaction_token_bytes",
            "Bytes of document token vectors late interaction read, by source.",
            ["source"],
            registry=r,
        )
        self.query_tokens = Counter(
            "sieve_late_interaction_query_tokens",
            "Where late-interaction searches got the query's token vectors: encoder pass (the same pass as the "
            "retrieval vector), cache (Redis) or worker (a ColBERT bundle's query encoder).",
            ["source"],
            registry=r,
        )
        self.degraded = Counter(
            "sieve_degraded_searches", "Searches answered with at least one DEGRADED stage.", registry=r
        )
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- reported by the front door -------------------------------------------------------------------
    def observe_call(self, method: str, code: str, seconds: float) -> None:
        name = method.lstrip("/")
        self.requests.labels(name, code).inc()
        self.request_seconds.labels(name).observe(seconds)

    def observe_search(self, response: search_pb2.SearchResponse) -> None:
        degraded = False
        for report in response.stages:
            stage = _enum_label(common_pb2.Stage, report.stage, "STAGE_").lower()
            status = _enum_label(search_pb2.StageStatus, report.status, "STAGE_STATUS_")
            self.stage_results.labels(stage, status).inc()
            if report.status == search_pb2.STAGE_STATUS_SKIPPED:
                continue
            self.stage_seconds.labels(stage).observe(report.took_ms / 1000)
            degraded = degraded or report.status == search_pb2.STAGE_STATUS_DEGRADED
            if report.token_source:  # late interaction from stored token vectors
                scored = report.candidates_in - report.tokens_pending
                self.token_reads.labels(report.token_source).inc(scored)
                self.token_reads.labels("pending").inc(report.tokens_pending)
                self.token_bytes.labels(report.token_source).inc(report.token_bytes)
                if report.query_token_source:
                    self.query_tokens.labels(report.query_token_source).inc()
            elif (
                report.stage != common_pb2.STAGE_RETRIEVE and report.method
            ):  # re-ranking: "cache", or "worker (...)" after a miss
                self.stage_cache.labels(stage, "hit" if report.method == "cache" else "miss").inc()
        if degraded:
            self.degraded.inc()

    # -- read at scrape time ----------------------------------------------------------------------------
    def watch_state(
        self,
        engine: Engine,
        jobs: JobManager,
        loop: asyncio.AbstractEventLoop,
        inflight: Callable[[], tuple[int, int]],
    ) -> None:
        self.inflight.set_function(lambda: inflight()[0])
        self.inflight_watches.set_function(lambda: inflight()[1])
        self.registry.register(_StateCollector(engine, jobs, loop))

    # -- the endpoint ---------------------------------------------------------------------------------
    def serve(self, address: str) -> None:
        """Serve `/metrics` on host:port; if that fails, log an ERROR and carry on without it."""
        if not address:
            return
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            self._http, self._thread = start_http_server(int(port), host, registry=self.registry)
        except OSError as exc:
            log.error(
                "cannot serve metrics on %s (SIEVE_METRICS_ADDRESS): %s; running without a metrics endpoint "
                "(set SIEVE_METRICS_ADDRESS to a free host:port, or empty to turn it off)",
                address,
                exc.strerror or exc,
            )
            return
        self.port = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _RunStateCollector(Collector):
    """What `sieve run` records about the workers and Redis it supervises (sieve_cli/supervisor.py)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        try:
            children = json.loads(self._path.read_text())["children"]
        except (OSError, ValueError, KeyError) as exc:  # not written yet, or a supervisor of another shape
            log.debug("metrics: cannot read %s: %s", self._path, type(exc).__name__)
            return
        restarts = CounterMetricFamily(
            "sieve_run_restarts",
            "Times `sieve run` started a dead child (a worker, the local Redis) again.",
            labels=["child"],
        )
        up = GaugeMetricFamily(
            "sieve_run_child_up", "1 if the child of `sieve run` is running.", labels=["child"]
        )
        for name, child in sorted(children.items()):
            restarts.add_metric([name], int(child.get("restarts", 0)))
            up.add_metric([name], 1 if child.get("up") else 0)
        yield restarts
        yield up


class _StateCollector(Collector):
    """Queue depths (Redis LLEN per Celery queue), collection sizes and jobs, read at scrape time."""

    def __init__(self, engine: Engine, jobs: JobManager, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._jobs = jobs
        self._loop = loop

    def describe(self) -> list[Any]:
        return []  # series vary with the collections; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._queues()
        yield from self._collections()
        yield from self._job_states()

    def _on_loop(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(SCRAPE_WAIT_S)

    def _queues(self) -> Iterator[GaugeMetricFamily]:
        from sieve_core.tasking import QUEUES

        up = GaugeMetricFamily("sieve_redis_up", "1 if Redis answered this scrape's queue-length query.")
        depth = GaugeMetricFamily(
            "sieve_queue_depth",
            "Tasks waiting in each Celery queue (Redis LLEN) at scrape time.",
            labels=["queue"],
        )
        try:
            lengths = self._engine.dispatcher.queue_lengths(QUEUES)
        except Exception as exc:  # unreachable, timed out, auth: say so, do not fail the scrape
            log.debug("metrics: cannot read queue lengths: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        if lengths is None:
            return  # no Redis configured: no queues to report
        up.add_metric([], 1)
        for queue, length in zip(QUEUES, lengths, strict=True):
            depth.add_metric([queue], int(length))
        yield up
        yield depth

    def _collections(self) -> Iterator[GaugeMetricFamily]:
        try:
            infos = self._on_loop(self._engine.list_collections)
        except Exception as exc:
            log.debug("metrics: cannot list collections: %s", type(exc).__name__)
            return
        docs = GaugeMetricFamily(
            "sieve_collection_documents",
            "Documents in each collection (one vector each in its index).",
            labels=["collection"],
        )
        generation = GaugeMetricFamily(
            "sieve_collection_generation",
            "Each collection's generation (moves on with every write).",
            labels=["collection"],
        )
        pending = GaugeMetricFamily(
            "sieve_collection_tokens_pending",
            "Documents whose late-interaction token vectors are not stored yet (collections that store them).",
            labels=["collection"],
        )
        for info in infos:
            docs.add_metric([info.name], info.document_count)
            generation.add_metric([info.name], info.generation)
            if info.token_storage is not None:
                pending.add_metric([info.name], info.token_storage.pending)
        yield docs
        yield generation
        yield pending

    def _job_states(self) -> Iterator[GaugeMetricFamily]:
        try:
            views = self._on_loop(lambda: self._jobs.list("", JOB_SCAN))
        except Exception as exc:  # e.g. shutting down
            log.debug("metrics: cannot list jobs: %s", type(exc).__name__)
            return
        counts = {"queued": 0, "running": 0}
        for view in views:
            if view.record.state in counts:
                counts[view.record.state] += 1
        jobs = GaugeMetricFamily("sieve_jobs", "Index jobs queued or running.", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
