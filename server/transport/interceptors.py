"""The server's front door: one interceptor around every call.

For each call, in this order: the request id (the client's `x-request-id`, or a new one) is set for the
handler's logs and sent back as trailing metadata; then, except for health and reflection, the call is
admitted or refused before any work: no or an unknown API key (UNAUTHENTICATED), a key whose role is too
low (PERMISSION_DENIED), not ready / shutting down (UNAVAILABLE), too many calls in progress
(RESOURCE_EXHAUSTED); the last two carry a `google.rpc.RetryInfo`. A request whose bytes do not decode
as the method's message gets INVALID_ARGUMENT. Errors the handler raises become statuses here and nowhere
else: a `SieveError` its own code and message, anything else INTERNAL with the request id as the incident
id (the traceback goes to the log).

SearchStream takes a slot like Search (it is as short, and does the same work). WatchJob streams do not
take one of the `max_inflight_requests` slots: a watch is mostly idle and may last
as long as its job, so counting it would let a few watchers starve every other call. Watches have their
own pool of the same size instead, so they cannot grow without bound either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from server.transport.metrics import ServerMetrics
from server.transport.security import KeyRing
from sieve_core.errors import InvalidArgument, SieveError
from sieve_core.logs import REQUEST_ID_METADATA, clean_request_id, request_id

log = logging.getLogger("sieve.server")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
WATCH_METHOD = "/sieve.v1.JobService/WatchJob"
DETAILS_TRAILER = "grpc-status-details-bin"
SEARCH_METHOD = "/sieve.v1.SearchService/Search"
SEARCH_STREAM_METHOD = "/sieve.v1.SearchService/SearchStream"
STARTING = "server is starting; retry shortly"  # the Python client also recognises this text
STOPPING = "the server is shutting down; retry shortly (on another replica, or after the restart)"
OVERLOADED = "the server is at its limit of {limit} calls in progress; retry shortly"


class Slots:
    """A counter of calls in progress with a limit (0: none) and a way to wait until none are left."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def take(self) -> bool:
        if self.limit and self.used >= self.limit:
            return False
        self.used += 1
        self._idle.clear()
        return True

    def release(self) -> None:
        self.used -= 1
        if self.used == 0:
            self._idle.set()

    async def drained(self, within_s: float) -> bool:
        """True once no call is in progress; False if some still are after `within_s` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within_s)
        return self.used == 0


class Undecodable:
    """What the wrapped deserializer returns for bytes that are not the method's message."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def decoding(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """`deserializer`, but undecodable bytes give an `Undecodable` instead of raising: grpc would answer
    a deserializer's exception with UNKNOWN (unary requests) or let it escape the handler as INTERNAL
    (streamed requests), and a malformed request is the client's error."""
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else f"the request of {method}"

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, or a parser limit (e.g. nesting depth): the bytes are at fault
            return Undecodable(name)

    return decode


def _decoded(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidArgument(f"the request does not decode as a {request.type_name} message")
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def retry_info_trailers(code: grpc.StatusCode, message: str, delay_ms: int) -> tuple[tuple[str, Any], ...]:
    """The request id and a `google.rpc.Status` carrying a `RetryInfo` (the standard trailer that tells a
    client the call was refused before any work and when to try again)."""
    delay = duration_pb2.Duration(seconds=delay_ms // 1000, nanos=(delay_ms % 1000) * 1_000_000)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return ((REQUEST_ID_METADATA, request_id.get()), (DETAILS_TRAILER, status.SerializeToString()))


def _take_request_id(context: grpc.aio.ServicerContext) -> str:
    """Set the call's request id for the handler's logs (each call runs in its own task, so it does not
    leak into other calls) and send it back as trailing metadata (aborts without trailers keep it)."""
    sent = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            sent = value
            break
    rid = clean_request_id(sent)
    request_id.set(rid)
    context.set_trailing_metadata(((REQUEST_ID_METADATA, rid),))
    return rid


class FrontDoor(grpc.aio.ServerInterceptor):
    """Request id, admission (readiness, shutdown, in-flight limit) and error mapping for every call."""

    def __init__(
        self,
        *,
        max_inflight: int,
        retry_after_ms: int,
        keys: KeyRing | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.ready = False  # set once the engine has loaded; until then calls are refused
        self.stopping = False  # set on shutdown; from then on calls are refused
        self.calls = Slots(max_inflight)
        self.watches = Slots(max_inflight)
        self._retry_after_ms = retry_after_ms
        self._keys = keys  # None: no authentication
        self._metrics = metrics

    async def drain(self, within_s: float) -> bool:
        """Wait until the calls in progress (watches aside) have finished; False if some still run."""
        return await self.calls.drained(within_s)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        call = self._call
        decode = decoding(handler.request_deserializer, method)
        serialize = handler.response_serializer

        if handler.unary_unary is not None:
            unary = handler.unary_unary
            observe = self._metrics.observe_search if self._metrics and method == SEARCH_METHOD else None

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with call(method, context):
                    response = await unary(_decoded(request), context)
                    if observe is not None:
                        observe(response)
                    return response

            return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)
        if handler.stream_unary is not None:
            collect = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                async with call(method, context):
                    return await collect(_decoded_stream(requests), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, decode, serialize)
        if handler.unary_stream is not None:
            produce = handler.unary_stream
            # A streamed search counts in the stage metrics once, by its final message (= Search's reply).
            final = self._metrics.observe_search if self._metrics and method == SEARCH_STREAM_METHOD else None

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with call(method, context):
                    async for response in produce(_decoded(request), context):
                        if final is not None and response.final:
                            final(response.result)
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, decode, serialize)
        if handler.stream_stream is not None:  # reflection's ServerReflectionInfo
            both = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with call(method, context):
                    async for response in both(_decoded_stream(requests), context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, decode, serialize)
        return handler

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        _take_request_id(context)
        started = time.perf_counter()
        slots = None
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        try:
            if not method.startswith(OPEN_PREFIXES):
                slots = await self._admit(method, context)
            try:
                yield
            except Exception as exc:
                await self._abort(exc, method, context)
            code = context.code() or code  # a handler may set a code and return
        except grpc.aio.AbortError:
            code = context.code()
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, or its deadline passed
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        finally:
            if slots is not None:
                slots.release()
            name = code.name if code is not None else "UNKNOWN"
            took = time.perf_counter() - started
            if self._metrics is not None:
                self._metrics.observe_call(method, name, took)
            log.debug("%s %s %.1f ms", method, name, took * 1000)  # an access log at DEBUG

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> Slots:
        """Refuse the call before any work, or take a slot for it (the caller releases it)."""
        if self._keys is not None:
            denial = self._keys.check(method, context.invocation_metadata())
            if denial is not None:
                log.info("%s refused: %s (peer %s)", method, denial.message, context.peer())
                await context.abort(denial.code, denial.message)
        if not self.ready or self.stopping:
            reason = "shutting_down" if self.stopping else "starting"
            await self._refuse(
                context, grpc.StatusCode.UNAVAILABLE, STOPPING if self.stopping else STARTING, reason
            )
        slots = self.watches if method == WATCH_METHOD else self.calls
        if not slots.take():
            await self._refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED.format(limit=slots.limit), "overload"
            )
        return slots

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, reason: str
    ) -> None:
        if self._metrics is not None:
            self._metrics.refused.labels(reason).inc()
        await context.abort(code, message, retry_info_trailers(code, message, self._retry_after_ms))

    @staticmethod
    async def _abort(exc: Exception, method: str, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, SieveError):
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        incident = request_id.get()
        log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see server log")
