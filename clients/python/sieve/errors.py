"""Errors raised by the Sieve client: one exception class per gRPC status, carrying status and details.

Every failed call raises a `SieveError` subclass, never a bare `grpc.RpcError`::

    try:
        client.get_collection("notes")
    except sieve.NotFound:
        ...
    except sieve.SieveError as exc:
        print(exc.code.name, exc.message, exc.retry_delay, exc.details)

`details` holds the `google.rpc` detail messages the server attached (the `grpc-status-details-bin`
trailer), e.g. `RetryInfo`, `BadRequest`, `ErrorInfo`; `retry_delay` is the server's `RetryInfo` in seconds.
The original `grpc.RpcError` is kept as `__cause__`.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2

DETAILS_TRAILER = "grpc-status-details-bin"

# The google.rpc detail types a server may attach; others are kept as the packed `Any`.
_DETAIL_TYPES: tuple[type[message.Message], ...] = (
    error_details_pb2.RetryInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    error_details_pb2.RequestInfo,
)


class SieveError(Exception):
    """A failed call: `code` (a `grpc.StatusCode`), `message` (the server's text), `details`
    (decoded `google.rpc` messages), `retry_delay` (seconds the server asked to wait, or None),
    `method` (the RPC, e.g. "/sieve.v1.SearchService/Search") and `attempts` (calls made, retries included).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: list[Any] | None = None,
        retry_delay: float | None = None,
        method: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or []
        self.retry_delay = retry_delay
        self.method = method
        self.attempts = attempts

    def __str__(self) -> str:
        where = f" ({self.method.rsplit('/', 1)[-1]}" + (
            f", after {self.attempts} attempts)" if self.attempts > 1 else ")"
        )
        return f"{self.code.name}: {self.message}{where if self.method else ''}"


class Cancelled(SieveError):
    code = grpc.StatusCode.CANCELLED


class Unknown(SieveError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(SieveError):
    """Bad input; the message names the field and the limit. Fix the request, do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(SieveError):
    """The call's deadline passed (the default deadline, or the `timeout` given)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(SieveError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SieveError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(SieveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SieveError):
    """The server is full (retried with its `retry_delay`) or the message is too large (not retried)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(SieveError):
    """E.g. a required stage with no model, or `min_generation` not reached in time."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SieveError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(SieveError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(SieveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SieveError):
    """A server bug; the message has an incident id to find in the server log."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(SieveError):
    """The server is starting, unreachable, or a required stage could not run. Retried where safe."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(SieveError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(SieveError):
    """No or a wrong API key."""

    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[SieveError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def _unpack(detail: any_pb2.Any) -> Any:
    for cls in _DETAIL_TYPES:
        if detail.Is(cls.DESCRIPTOR):
            out = cls()
            detail.Unpack(out)
            return out
    return detail


def status_details(trailing_metadata: Any) -> list[Any]:
    """The google.rpc detail messages in a call's trailers (empty when there are none or they are bad)."""
    for key, value in trailing_metadata or ():
        if key == DETAILS_TRAILER and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except message.DecodeError:
                return []
            return [_unpack(d) for d in status.details]
    return []


def retry_delay_of(details: list[Any]) -> float | None:
    for detail in details:
        if isinstance(detail, error_details_pb2.RetryInfo) and detail.HasField("retry_delay"):
            return detail.retry_delay.ToTimedelta().total_seconds()
    return None


def from_rpc_error(exc: grpc.RpcError, method: str = "", attempts: int = 1) -> SieveError:
    """The `SieveError` subclass for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code: grpc.StatusCode = exc.code()
    text: str = exc.details() or code.name
    details = status_details(exc.trailing_metadata())
    cls = _BY_CODE.get(code, SieveError)
    return cls(
        text,
        code=code,
        details=details,
        retry_delay=retry_delay_of(details),
        method=method,
        attempts=attempts,
    )
