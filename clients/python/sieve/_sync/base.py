"""The plumbing every call goes through: the channel (one per client, to one server or several), the API key,
deadlines, retries (`sieve.retry`) and errors (`sieve.errors`), for unary calls and server streams."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from sieve import _channel
from sieve._channel import DEFAULT_ADDRESS, Timeouts
from sieve.errors import SieveError, from_rpc_error
from sieve.retry import RetryPolicy, is_retryable, next_wait
from sieve.v1 import collections_pb2_grpc, documents_pb2_grpc, jobs_pb2_grpc, search_pb2_grpc

log = logging.getLogger("sieve.client")
T = TypeVar("T")
C = TypeVar("C", bound="ClientBase")

P = "/sieve.v1."  # method names as gRPC spells them, for retry decisions and error messages


def retry_wait(policy: RetryPolicy, error: SieveError, attempt: int, deadline: float) -> float | None:
    """Seconds to wait before trying `error.method` again, or None to raise `error` now."""
    if not is_retryable(error.method, error.code, error.message, error.retry_delay):
        return None
    return next_wait(policy, attempt, error.retry_delay, deadline - time.monotonic())


class ClientBase:
    """A blocking client for a Sieve server.

    address: "host:port", or several servers as a list of them (or one comma-separated string): calls are
    spread over the servers that are up and moved to another on UNAVAILABLE (see `sieve._channel`); one host
    name that resolves to several addresses is spread the same way. tls: use TLS (implied by
    root_certificates / certificate_chain); certificates are PEM bytes or file paths, none means the system
    trust store. api_key: sent as `authorization: Bearer <key>` with every call. timeouts / retry: default
    deadlines and retry policy. channel: use this channel instead of making one (the client then does not
    close it). options: extra grpc channel options.
    """

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        api_key: str | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.address = address
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._metadata = _channel.metadata(api_key)
        self._owns_channel = channel is None
        self.tls: bool | None = None  # unknown for a channel passed in
        if channel is None:
            creds = _channel.credentials(tls, root_certificates, private_key, certificate_chain)
            target, count = _channel.target(address)
            opts = _channel.options(options, count)
            channel = (
                grpc.insecure_channel(target, options=opts)
                if creds is None
                else grpc.secure_channel(target, creds, options=opts)
            )
            self.tls = creds is not None
        self.channel = channel
        self._collections = collections_pb2_grpc.CollectionServiceStub(channel)
        self._documents = documents_pb2_grpc.DocumentServiceStub(channel)
        self._search = search_pb2_grpc.SearchServiceStub(channel)
        self._jobs = jobs_pb2_grpc.JobServiceStub(channel)

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, call: Callable[..., T], request: Any, timeout: float | None) -> T:
        deadline = time.monotonic() + (self.timeouts.default if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, P + method, attempt)
                wait = retry_wait(self.retry, error, attempt, deadline)
                if wait is None:
                    raise error from exc
                log.info("retrying %s in %.2fs (attempt %d): %s", method, wait, attempt + 1, error)
                time.sleep(wait)

    def _stream(
        self, method: str, call: Callable[..., Any], request: Any, timeout: float, *, resume: bool
    ) -> Iterator[Any]:
        """The messages of a server stream, retried as a unary call is while nothing has arrived. After a
        message: `resume` (a stream that restarts from the current state, WatchJob) reconnects with the
        attempt count reset; otherwise (SearchStream) the error is raised."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            received = False
            stream = call(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)
            try:
                for message in stream:
                    received = True
                    attempt = 0 if resume else attempt
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, P + method, max(attempt, 1))
                wait = (
                    None
                    if received and not resume
                    else retry_wait(self.retry, error, max(attempt, 1), deadline)
                )
                if wait is None:
                    raise error from exc
                log.info("retrying %s in %.2fs (attempt %d): %s", method, wait, attempt + 1, error)
                time.sleep(wait)
            finally:
                stream.cancel()
