"""Wiring of the gRPC server: servicers, health, reflection, error mapping, start-up and shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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

from server.engine import Engine
from server.jobs import JobManager
from server.servicers import CollectionServicer, DocumentServicer, JobServicer, SearchServicer
from sieve_core.config import Settings
from sieve_core.errors import SieveError
from sieve_core.logs import REQUEST_ID_METADATA, clean_request_id, configure_logging, request_id

log = logging.getLogger("sieve.server")

SERVICE_NAMES = (
    collections_pb2.DESCRIPTOR.services_by_name["CollectionService"].full_name,
    documents_pb2.DESCRIPTOR.services_by_name["DocumentService"].full_name,
    search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
)
_ALWAYS_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place where errors become gRPC statuses; also refuses calls until the engine is ready.

    Covers unary and client-streaming handlers (one response) and server-streaming ones (an error
    raised while the stream runs ends it with the mapped status).
    """

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        self._is_ready = is_ready

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        gated = not method.startswith(_ALWAYS_OPEN)
        if handler.unary_unary is not None or handler.stream_unary is not None:
            inner = handler.unary_unary or handler.stream_unary

            async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _take_request_id(context)
                await self._gate(gated, context)
                try:
                    return await inner(request, context)
                except Exception as exc:
                    await self._abort(exc, method, context)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(
                guarded,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                _take_request_id(context)
                await self._gate(gated, context)
                try:
                    async for response in streaming(request, context):
                        yield response
                except Exception as exc:
                    await self._abort(exc, method, context)

            return grpc.unary_stream_rpc_method_handler(
                guarded_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _gate(self, gated: bool, context: grpc.aio.ServicerContext) -> None:
        if gated and not self._is_ready():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is starting; retry shortly")

    @staticmethod
    async def _abort(exc: Exception, method: str, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, SieveError):
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        incident = request_id.get()
        log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see server log")


def _take_request_id(context: grpc.aio.ServicerContext) -> None:
    """The call's request id (the client's `x-request-id`, or a new one): set for the handler's logs (each
    call runs in its own task, so this does not leak into other calls) and sent back as trailing metadata
    (aborts without their own trailers keep it)."""
    sent = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            sent = value
            break
    rid = clean_request_id(sent)
    request_id.set(rid)
    context.set_trailing_metadata(((REQUEST_ID_METADATA, rid),))


class SieveServer:
    """A started gRPC server around an Engine. `port` is the bound port (useful with address :0)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        self.jobs = JobManager(self.engine, settings)
        self.health = health.aio.HealthServicer()
        self._ready = False
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor(lambda: self._ready)], options=options)
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
        self.port = self.server.add_insecure_port(settings.grpc_address)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.grpc_address}")

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        for name in SERVICE_NAMES:
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen at once (health says NOT_SERVING), load the collections, then report SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s (port %d); loading collections", self.settings.grpc_address, self.port)
        await self.engine.start()
        await self.jobs.start()  # resumes the jobs a previous run left unfinished
        self._ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving")

    async def stop(self, grace: float = 5.0) -> None:
        """Refuse new work, pause jobs at a checkpoint (they resume on the next start), drain in-flight
        calls for up to `grace` seconds, snapshot the indexes."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.jobs.stop()  # also ends WatchJob streams, which would otherwise hold up the grace period
        await self.server.stop(grace)
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
