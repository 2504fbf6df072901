"""Wiring of the gRPC server: servicers, health, reflection, error mapping, start-up and shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from server.core.engine import Engine
from server.jobs.manager import JobManager
from server.transport.interceptors import FrontDoor
from server.transport.metrics import ServerMetrics
from server.transport.security import load_keys, server_credentials
from server.transport.servicers import CollectionServicer, DocumentServicer, JobServicer, SearchServicer
from sieve_core import kernels
from sieve_core.config import Settings
from sieve_core.logs import configure_logging

log = logging.getLogger("sieve.server")

SERVICE_NAMES = (
    collections_pb2.DESCRIPTOR.services_by_name["CollectionService"].full_name,
    documents_pb2.DESCRIPTOR.services_by_name["DocumentService"].full_name,
    search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
)


class SieveServer:
    """A started gRPC server around an Engine. `port` is the bound port (useful with address :0)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Checked before anything else is opened: a bad entry or file stops the start with its reason.
        keys = load_keys(settings)
        credentials = server_credentials(settings)
        self.engine = Engine(settings)
        self.jobs = JobManager(self.engine, settings)
        self.health = health.aio.HealthServicer()
        # Always counted; served over HTTP only with SIEVE_METRICS_ADDRESS.
        self.metrics = ServerMetrics(run_state_file=settings.run_state_file)
        self.front = FrontDoor(
            max_inflight=settings.max_inflight_requests,
            retry_after_ms=settings.overload_retry_after_ms,
            keys=keys,
            metrics=self.metrics,
        )
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(interceptors=[self.front], options=options)
        collections_pb2_grpc.add_CollectionServiceServicer_to_server(
            CollectionServicer(self.engine), self.server
        )
        documents_pb2_grpc.add_DocumentServiceServicer_to_server(DocumentServicer(self.engine), self.server)
        search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(self.engine), self.server)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        if credentials is None:
            self.port = self.server.add_insecure_port(settings.grpc_address)
        else:
            self.port = self.server.add_secure_port(settings.grpc_address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.grpc_address}")
        self.tls = credentials is not None
        log.info(
            "API keys: %s; TLS: %s",
            f"{len(keys)} configured" if keys is not None else "none (no authentication)",
            ("on, client certificates required" if settings.tls_client_ca_file else "on")
            if self.tls
            else "off",
        )

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        for name in SERVICE_NAMES:
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen at once (health says NOT_SERVING), load the collections, then report SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        front = self.front
        self.metrics.watch_state(
            self.engine, self.jobs, asyncio.get_running_loop(), lambda: (front.calls.used, front.watches.used)
        )
        await asyncio.to_thread(self.metrics.serve, self.settings.metrics_address)
        await self.server.start()
        log.info("listening on %s (port %d); loading collections", self.settings.grpc_address, self.port)
        await self.engine.start()
        # MaxSim's integer product: its session and exactness check (~0.1 s) here, not in a first search.
        await asyncio.to_thread(kernels.available)
        await self.jobs.start()  # resumes the jobs a previous run left unfinished
        self.front.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving")

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown, in this order:

        1. health NOT_SERVING, and new calls refused (UNAVAILABLE with a RetryInfo);
        2. calls in progress get up to `grace` seconds (default SIEVE_SHUTDOWN_GRACE_S) to finish; jobs keep
           running meanwhile, and WatchJob streams keep reporting them;
        3. the listener closes, cancelling what is left (watchers see UNAVAILABLE and may watch again after
           the restart);
        4. running jobs pause at their next checkpoint (up to SIEVE_SHUTDOWN_GRACE_S again; they resume on
           the next start);
        5. the indexes are snapshotted.

        Jobs pause after the drain, not before: pausing closes the job store, which GetJob, ListJobs or an
        UploadIndexJob still in progress need.
        """
        grace = self.settings.shutdown_grace_s if grace is None else grace
        self.front.stopping = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if not await self.front.drain(grace):
            left = self.front.calls.used
            log.warning("calls still in progress after %.1f s: %d; cancelling them", grace, left)
        await self.server.stop(0.2)
        await self.jobs.stop(self.settings.shutdown_grace_s)
        await asyncio.to_thread(self.metrics.close)
        await self.engine.close()
        log.info("stopped")


async def serve(settings: Settings, started: Callable[[SieveServer], Awaitable[None]] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    configure_logging(settings.log_level, settings.log_format)
    log.info("settings: %s", json.dumps(settings.redacted(), sort_keys=True))
    server = SieveServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if started is not None:
        await started(server)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
