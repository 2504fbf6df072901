"""Embedding an index job's batches on the Celery `embed` queue (Redis configured).

The worker embedder sends one `sieve.embed` task per batch (with the collection's token format when it
stores token vectors, so the worker returns them compressed from the same encoder pass, or from the
collection's ColBERT bundle) and waits for results in one thread of its own, never on the event loop; the
server commits vectors and token vectors with the documents. All of the job's Celery calls (send, wait,
revoke) happen in that thread, because Celery's result backend is per thread: `EmbedTasks` is that
thread's side, `WorkerEmbedder` the event loop's (when to wait, re-send or give up).

A batch that a worker started and did not answer within SIEVE_JOB_BATCH_TIMEOUT_S, or that failed
(e.g. its pool process died more often than Celery retries), is sent again, up to
SIEVE_JOB_BATCH_RETRIES times; then the job fails with the reason. A batch that no worker takes is not
re-sent (it would only queue again): after SIEVE_JOB_WORKER_WAIT_S the job reports why it waits (no
worker consumes the queue, or all are busy), and with no consumer (or no Redis) for
SIEVE_JOB_WORKER_TIMEOUT_S it fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from pydantic import ValidationError

from server.jobs.embed import POLL_S, Embedded, EmbedFailed, JobHooks, Pending, Stopped, as_embedded
from sieve_core import redis_conn
from sieve_core.config import Settings
from sieve_core.contracts import EmbedRequest, EmbedResult, TokenFormatSpec
from sieve_core.logs import REQUEST_ID_HEADER
from sieve_core.token_format import TokenFormat

log = logging.getLogger(__name__)


class EmbedTasks:
    """One job's Celery calls, made only in the job's own thread: send a batch, poll it, revoke it, and
    look at who could take a queued one (the queue's length, its consumers)."""

    def __init__(self, settings: Settings, fields: dict[str, Any], request_id: str) -> None:
        self._settings = settings
        self._fields = fields  # EmbedRequest's fields besides the texts
        self._request_id = request_id
        self._app: Any = None
        self._consumers: tuple[float, int] | None = None  # (checked at, embed-queue consumers)
        self._redis: Any = None
        self._queue_empty_since: float | None = None

    def _client(self) -> Any:
        if self._app is None:
            from sieve_core.tasking import client_app as create_app

            app = create_app(self._settings)
            # The result backend retries a lost connection for ~20 s by default; the job loop retries itself.
            options = dict(app.conf.result_backend_transport_options or {})
            options["retry_policy"] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
            app.conf.result_backend_transport_options = options
            self._app = app
        return self._app

    def send(self, pending: Pending) -> None:
        from sieve_core.tasking import TASK_EMBED

        try:
            request = EmbedRequest(texts=pending.texts, **self._fields)
        except ValidationError as exc:  # e.g. a text longer than the task contract allows
            first = exc.errors()[0]
            pending.refused = f"the embed task refuses it: {first.get('msg', exc)}"[:300]
            return
        try:
            pending.task = self._client().send_task(
                TASK_EMBED,
                args=[request.to_json()],
                retry=False,
                headers={REQUEST_ID_HEADER: self._request_id},
            )
            pending.error = ""
        except Exception as exc:
            self._app = None  # a client that gave up on Redis stays broken: start afresh next time
            pending.task, pending.error = None, f"cannot reach the broker: {self._describe(exc)}"
        pending.sent_at, pending.started_at = time.monotonic(), None

    def forget(self, pending: Pending) -> None:
        if pending.task is None:
            return
        try:
            self._client().control.revoke(pending.task.id)
            pending.task.forget()
        except Exception as exc:  # best effort: an unrevoked task only costs a worker some time
            log.debug("could not revoke %s: %s", pending.task.id, exc)
        pending.task = None

    def resend(self, pending: Pending) -> None:
        self.forget(pending)
        self.send(pending)

    def poll(self, pending: Pending) -> tuple[str, Any]:
        """("done", vectors) | ("waiting", task state) | ("failed", reason) | ("unreachable", reason)."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        task = pending.task
        try:
            payload = task.get(timeout=POLL_S, propagate=True)
        except CeleryTimeout:
            try:
                return "waiting", task.state
            except Exception as exc:
                return self._unreachable(pending, exc)
        except Exception as exc:
            reason = self._describe(exc)
            try:
                failed = task.state == "FAILURE"
            except Exception:
                failed = False
            if not failed:  # the task did not fail: the connection did
                return self._unreachable(pending, exc)
            task.forget()
            return "failed", reason
        task.forget()  # results are large; Redis need not keep them for result_expires
        return self._read(pending, EmbedResult.from_json(payload))

    def _read(self, pending: Pending, result: EmbedResult) -> tuple[str, Any]:
        vectors = result.vectors()
        if vectors.shape[0] != len(pending.texts):
            return "failed", f"the worker returned {vectors.shape[0]} vectors for {len(pending.texts)} texts"
        blobs = None
        if self._fields["token_format"] is not None:
            blobs = result.token_blobs()
            if len(blobs) != len(pending.texts):
                return (
                    "failed",
                    f"the worker returned {len(blobs)} token blobs for {len(pending.texts)} texts",
                )
        return "done", as_embedded(pending.ids, vectors, blobs)

    def _unreachable(self, pending: Pending, exc: Exception) -> tuple[str, str]:
        self._app = None
        pending.task, pending.error = None, f"cannot reach Redis: {self._describe(exc)}"
        return "unreachable", pending.error

    def _describe(self, exc: BaseException) -> str:
        """`Type: message` for the job's status and reason: short, never with the Redis password in it."""
        return redis_conn.explain(exc, self._settings)

    def queue_empty_for(self, seconds: float) -> bool:
        """Whether the embed queue has held no message at every look over the last `seconds`."""
        from sieve_core.tasking import QUEUE_EMBED

        try:
            if self._redis is None:
                self._redis = redis_conn.client(self._settings, timeout_s=2)
            # kombu keeps a queue's messages in a list named after it (and per priority step, if used).
            keys = [QUEUE_EMBED, *(f"{QUEUE_EMBED}\x06\x16{p}" for p in (3, 6, 9))]
            waiting = sum(self._redis.llen(k) for k in keys)
        except Exception:
            return False
        now = time.monotonic()
        if waiting:
            self._queue_empty_since = None
            return False
        self._queue_empty_since = self._queue_empty_since or now
        return now - self._queue_empty_since >= seconds

    def embed_consumers(self) -> int:
        """Workers consuming the embed queue (asked at most every 5 s; a broadcast that takes 1 s)."""
        from sieve_core.tasking import QUEUE_EMBED

        now = time.monotonic()
        if self._consumers is not None and now - self._consumers[0] < 5.0:
            return self._consumers[1]
        try:
            replies = self._client().control.inspect(timeout=1.0).active_queues() or {}
        except Exception:
            replies = {}
        count = sum(1 for queues in replies.values() if any(q.get("name") == QUEUE_EMBED for q in queues))
        self._consumers = (time.monotonic(), count)
        return count

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


class WorkerEmbedder:
    """Batches as `sieve.embed` tasks on the `embed` queue; results waited for in the job's own thread.

    A job runs outside any call, so its tasks carry `job-<job id>` as their request id: the worker's log
    lines about a job's batches can be found by the job's id."""

    name = "workers"

    def __init__(
        self,
        settings: Settings,
        model: str,
        token_format: TokenFormat | None,
        token_model: str | None,
        job_id: str,
    ) -> None:
        self._settings = settings
        # With a token format the worker also returns the texts' compressed token vectors: `token_model`'s
        # (the collection's ColBERT bundle), or with None the bi-encoder's own from the same encoder run.
        fields: dict[str, Any] = {
            "model": model,
            "token_format": TokenFormatSpec.of(token_format) if token_format is not None else None,
            "token_model": token_model if token_format is not None else None,
        }
        self._tasks = EmbedTasks(settings, fields, f"job-{job_id}")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"sieve-job-{job_id[:8]}")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args))

    async def submit(self, ids: list[str], texts: list[str]) -> Pending:
        pending = Pending(ids, texts)
        if texts:
            await self._call(self._tasks.send, pending)
        return pending

    async def result(self, pending: Pending, job: JobHooks) -> dict[str, Embedded]:
        if not pending.texts:
            return {}
        if pending.refused:
            raise EmbedFailed(pending.refused, True, refused=True)
        s = self._settings
        stuck_since: float | None = None  # since when no worker (or no Redis) could take the batch
        while True:
            if job.stop_requested:
                raise Stopped
            now = time.monotonic()
            if pending.task is None:
                stuck_since = stuck_since or now
                job.set_status(f"waiting for Redis: {pending.error}", True)
                if now - stuck_since > s.job_worker_timeout_s:
                    raise EmbedFailed(
                        f"Redis was unreachable for {s.job_worker_timeout_s:.0f} s ({pending.error})", False
                    )
                await asyncio.sleep(1.0)
                await self._call(self._tasks.send, pending)
                continue
            kind, value = await self._call(self._tasks.poll, pending)
            if kind == "done":
                job.set_status("", False)
                return value
            if kind == "unreachable":
                continue
            if kind == "waiting" and value == "STARTED":
                stuck_since = None
                pending.started_at = pending.started_at or now
                job.set_status("", False)
                if now - pending.started_at <= s.job_batch_timeout_s:
                    continue
                kind, value = "failed", f"no answer within {s.job_batch_timeout_s:.0f} s of starting"
            if kind == "failed":
                if not await self._send_again(
                    pending, job, "embed task failed (%s); sending the batch again", value
                ):
                    raise EmbedFailed(f"embedding failed {pending.attempts} times; last: {value}", True)
                continue
            # Queued: nobody has taken it yet.
            pending.started_at = None
            if now - pending.sent_at >= s.job_worker_wait_s:
                stuck_since = await self._queued(pending, job, now, stuck_since)

    async def _queued(
        self, pending: Pending, job: JobHooks, now: float, stuck_since: float | None
    ) -> float | None:
        """A batch no worker has taken for SIEVE_JOB_WORKER_WAIT_S: say why (busy, or no consumer, which
        fails the job after SIEVE_JOB_WORKER_TIMEOUT_S), or send it again if its message is lost. Returns
        since when no worker could take it (None: workers are there)."""
        s = self._settings
        consumers = await self._call(self._tasks.embed_consumers)
        if consumers:
            if await self._call(self._tasks.queue_empty_for, s.job_worker_wait_s):
                # Workers are there, the queue has been empty a while, and nobody started the batch:
                # its message is lost (e.g. Redis restarted without persistence). Send it again.
                lost = "an embed task is neither queued nor started; sending the batch again"
                if not await self._send_again(pending, job, lost):
                    raise EmbedFailed(
                        f"a batch was lost from the embed queue {pending.attempts} times", False
                    )
                return None
            job.set_status(f"waiting for a free embed worker ({consumers} consume the queue)", False)
            return None
        stuck_since = stuck_since or now
        job.set_status(
            "waiting for workers: no worker consumes the embed queue "
            "(start one: celery -A workers.celery_app worker -Q embed)",
            True,
        )
        if now - stuck_since > s.job_worker_timeout_s:
            raise EmbedFailed(f"no worker consumed the embed queue for {s.job_worker_timeout_s:.0f} s", False)
        return stuck_since

    async def _send_again(self, pending: Pending, job: JobHooks, warning: str, *args: Any) -> bool:
        """Counts an attempt and sends the batch again; False (nothing sent) once its retries are spent."""
        pending.attempts += 1
        if pending.attempts > self._settings.job_batch_retries:
            return False
        log.warning(warning, *args)
        job.count_retry()
        await self._call(self._tasks.resend, pending)
        return True

    async def discard(self, pendings: list[Pending]) -> None:
        for pending in pendings:
            await self._call(self._tasks.forget, pending)

    async def close(self) -> None:
        await self._call(self._tasks.close)
        self._thread.shutdown(wait=False)
