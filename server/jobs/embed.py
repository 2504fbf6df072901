"""Embedding an index job's batches: on the Celery `embed` queue when Redis is configured, else in-process.

Each job gets its own embedder (the `Embedder` protocol): `InProcessEmbedder` below, or `WorkerEmbedder`
(server/jobs/embed_workers.py), which sends one `sieve.embed` task per batch and waits for the workers.
Both hand back, per document, its vector and (for a late-interaction collection) its compressed token
vectors; the job runner commits them with the documents.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from sieve_core.config import Settings

POLL_S = 0.5


class EmbedFailed(Exception):
    """A batch could not be embedded. `by_content`: the task itself failed (its texts may be at fault, so
    the job looks for the bad line); otherwise no worker or no Redis was there (the job fails)."""

    def __init__(self, reason: str, by_content: bool, refused: bool = False) -> None:
        super().__init__(reason)
        self.by_content = by_content
        self.refused = refused  # the task contract refused the texts: nothing was sent, trying is free


class Embedded(NamedTuple):
    """One document's vector, and its compressed token vectors when the collection stores them."""

    vector: np.ndarray
    tokens: bytes | None = None


def as_embedded(ids: list[str], vectors: np.ndarray, blobs: list[bytes] | None) -> dict[str, Embedded]:
    if blobs is None:
        return {i: Embedded(v) for i, v in zip(ids, vectors, strict=True)}
    return {i: Embedded(v, b) for i, v, b in zip(ids, vectors, blobs, strict=True)}


class Stopped(Exception):
    """The job was asked to stop (cancel or shutdown) while it waited for a batch."""


class JobHooks(Protocol):
    """What an embedder reports to its job."""

    @property
    def stop_requested(self) -> bool: ...

    def set_status(self, status: str, waiting_for_workers: bool) -> None: ...

    def count_retry(self) -> None: ...


@dataclass
class Pending:
    """One batch's embedding: the ids and texts sent, and the task (or future) computing them."""

    ids: list[str]
    texts: list[str]
    task: Any = None  # celery AsyncResult (worker embedder)
    future: Future | None = None  # in-process embedder
    error: str = ""  # why the last send failed (task is None)
    refused: str = ""  # why the task contract refused the texts (nothing was sent)
    sent_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    attempts: int = 0


class Embedder(Protocol):
    """Embeds a job's batches: one of the two below."""

    name: str

    async def submit(self, ids: list[str], texts: list[str]) -> Pending: ...

    async def result(self, pending: Pending, job: JobHooks) -> dict[str, Embedded]: ...

    async def discard(self, pendings: list[Pending]) -> None: ...

    async def close(self) -> None: ...


class InProcessEmbedder:
    """No Redis configured: embed on the server, in one thread of the job's own (search keeps its pool).

    With a token format the bi-encoder's own token vectors come from the same run (zero-shot); a ColBERT
    bundle's are left pending (the server's token backfill computes them)."""

    name = "in-process"

    def __init__(
        self,
        embed: Callable[[list[str]], tuple[np.ndarray, list[bytes] | None]],
        settings: Settings,
    ) -> None:
        # Blocking: the server's own runner of the collection's model; with the collection's token format
        # (zero-shot) it returns the token vectors of the same run too.
        self._embed_texts = embed
        self._settings = settings
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sieve-job-embed")
        self._closed = threading.Event()

    def _embed(self, ids: list[str], texts: list[str]) -> dict[str, Embedded]:
        # One ONNX run at a time, so that a stopping job (or server) waits for one run, not a whole batch.
        step = self._settings.embed_batch_size
        out: dict[str, Embedded] = {}
        for i in range(0, len(texts), step):
            if self._closed.is_set():
                raise Stopped
            vectors, blobs = self._embed_texts(texts[i : i + step])
            out.update(as_embedded(ids[i : i + step], vectors, blobs))
        return out

    async def submit(self, ids: list[str], texts: list[str]) -> Pending:
        pending = Pending(ids, texts)
        if texts:
            pending.future = self._thread.submit(self._embed, ids, texts)
        return pending

    async def result(self, pending: Pending, job: JobHooks) -> dict[str, Embedded]:
        if pending.future is None:
            return {}
        waiting = asyncio.wrap_future(pending.future)
        while True:
            if job.stop_requested:
                raise Stopped
            done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
            if done:
                break
        try:
            return waiting.result()
        except Stopped:
            raise
        except Exception as exc:
            raise EmbedFailed(f"embedding failed: {type(exc).__name__}: {exc}"[:500], True) from None

    async def discard(self, pendings: list[Pending]) -> None:
        for pending in pendings:
            if pending.future is not None:
                pending.future.cancel()

    async def close(self) -> None:
        self._closed.set()
        self._thread.shutdown(wait=False, cancel_futures=True)
