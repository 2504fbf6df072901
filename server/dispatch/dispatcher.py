"""Dispatch of model work to the Celery workers, without blocking the event loop: cross-encoder re-ranks,
a ColBERT bundle's query encoding (the server then runs MaxSim from its store) and the token vectors of
documents still pending.

The server sends a task with `expires` set from the request's remaining time, then waits for its
result in a thread of a dedicated executor (never `AsyncResult.get()` on the loop). Anything that
keeps the stage from finishing in time (no Redis configured, Redis down, no worker, a slow or killed
worker) becomes a `StageUnavailable` with a reason the response reports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel

from sieve_core import redis_conn
from sieve_core.config import Settings
from sieve_core.contracts import (
    Candidate,
    Contract,
    CrossEncoderRequest,
    CrossEncoderResult,
    DocumentTokensRequest,
    DocumentTokensResult,
    QueryTokensRequest,
    QueryTokensResult,
    TokenFormatSpec,
)
from sieve_core.errors import SieveError
from sieve_core.logs import REQUEST_ID_HEADER, request_id
from sieve_core.token_format import TokenFormat

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Contract)


MIN_TASK_TIMEOUT_S = 0.008


class StageUnavailable(Exception):
    """A re-ranking stage could not finish; the message says why (it goes into the stage report)."""


class OutOfTime(StageUnavailable):
    """The time given ran out: before the task was sent (`started` False) or while waiting for it."""

    def __init__(self, message: str, *, started: bool) -> None:
        super().__init__(message)
        self.started = started


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app = None
        self._redis = None
        if settings.redis_url is not None:
            self._app = self._new_app()
            self._redis = redis_conn.client(settings, timeout_s=0.5)
        # Errors a task itself raises (reported as they are); anything else is the connection's fault.
        self._task_errors: tuple[type[BaseException], ...] = (SieveError, ValueError)
        # Each waiting re-rank holds a thread until its result or its deadline.
        self._waiters = ThreadPoolExecutor(64, thread_name_prefix="sieve-rerank-wait")

    async def query_tokens(self, model: str, query: str, timeout_s: float) -> QueryTokensResult:
        """A ColBERT bundle's token vectors for one query, from a `colbert` worker (MaxSim runs here)."""
        from sieve_core.tasking import TASK_QUERY_TOKENS

        request = QueryTokensRequest(query=query, model=model)
        return await self._rerank(TASK_QUERY_TOKENS, request, QueryTokensResult, timeout_s)

    async def document_tokens(
        self, model: str, texts: list[str], fmt: TokenFormat, timeout_s: float
    ) -> DocumentTokensResult:
        """Pending documents' token vectors, computed by an `embed` worker (the server stores them)."""
        from sieve_core.tasking import TASK_DOCUMENT_TOKENS

        request = DocumentTokensRequest(texts=texts, model=model, token_format=TokenFormatSpec.of(fmt))
        return await self._rerank(TASK_DOCUMENT_TOKENS, request, DocumentTokensResult, timeout_s)

    async def cross_encoder(
        self, model: str, query: str, texts: list[str], timeout_s: float
    ) -> CrossEncoderResult:
        from sieve_core.tasking import TASK_CROSS_ENCODER

        request = CrossEncoderRequest(query=query, model=model, candidates=[Candidate.of(t) for t in texts])
        return await self._rerank(TASK_CROSS_ENCODER, request, CrossEncoderResult, timeout_s)

    async def _rerank(self, task: str, request: BaseModel, result_type: type[R], timeout_s: float) -> R:
        if self._app is None:
            raise StageUnavailable("no Redis is configured (SIEVE_REDIS_URL), so no re-ranking workers")
        # Below a Celery round trip (9-12 ms measured here) nothing can come back in time. Latency budgets
        # (server/core/budget.py) plan re-ranking into tens of milliseconds, so the floor is that, not more.
        if timeout_s <= MIN_TASK_TIMEOUT_S:
            raise OutOfTime(
                f"no time left before the deadline ({max(timeout_s, 0) * 1000:.0f} ms)", started=False
            )
        loop = asyncio.get_running_loop()
        # Read here, in the call's context: the executor thread does not inherit contextvars.
        call = partial(self._call, task, request, timeout_s, request_id.get())
        waiting = loop.run_in_executor(self._waiters, call)
        try:
            # The deadline holds even if a client library blocks longer than asked (the thread finishes later).
            # The slack is a tenth of the timeout (at most 20 ms): a 20 ms latency budget must not overrun by 20 ms.
            payload = await asyncio.wait_for(waiting, timeout_s + min(0.02, timeout_s / 10))
        except TimeoutError:
            raise OutOfTime(f"no worker answered within {timeout_s * 1000:.0f} ms", started=True) from None
        return result_type.from_json(payload)

    def _call(self, task: str, request: Any, timeout_s: float, rid: str) -> dict:
        from celery.exceptions import TimeoutError as CeleryTimeout

        assert self._app is not None and self._redis is not None
        try:
            self._redis.ping()
        except Exception as exc:
            raise StageUnavailable(f"cannot reach Redis: {self._describe(exc)}") from None
        try:
            # retry=False: with Redis down, fail now rather than retry past the deadline.
            result = self._app.send_task(
                task,
                args=[request.to_json()],
                expires=timeout_s,
                retry=False,
                headers={REQUEST_ID_HEADER: rid},
            )
        except Exception as exc:
            self._app = self._new_app()  # a client that gave up on Redis stays broken: start afresh
            raise StageUnavailable(f"cannot reach the broker: {self._describe(exc)}") from None
        try:
            return result.get(timeout=timeout_s, propagate=True)
        except CeleryTimeout:
            raise OutOfTime(f"no worker answered within {timeout_s * 1000:.0f} ms", started=True) from None
        except Exception as exc:
            if not isinstance(exc, self._task_errors):
                self._app = self._new_app()  # a connection-level failure: start afresh (see above)
            raise StageUnavailable(f"the worker failed: {self._describe(exc)}") from None

    def _describe(self, exc: BaseException) -> str:
        """`Type: message` for a stage report: short, and never with the Redis password in it."""
        return redis_conn.explain(exc, self._settings)

    def queue_lengths(self, queues: Sequence[str]) -> list[int] | None:
        """Tasks waiting in each queue (Redis LLEN, one round trip, 0.5 s socket timeout); None when no
        Redis is configured. Raises what the Redis client raises (unreachable, timed out, auth)."""
        if self._redis is None:
            return None
        pipe = self._redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return [int(n) for n in pipe.execute()]

    def _new_app(self):
        from sieve_core.tasking import client_app as create_app

        app = create_app(self._settings)
        # The result backend retries a lost connection for about 20 s by default; a search cannot wait.
        options = dict(app.conf.result_backend_transport_options or {})
        options["retry_policy"] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}
        app.conf.result_backend_transport_options = options
        return app

    def close(self) -> None:
        self._waiters.shutdown(wait=False, cancel_futures=True)
