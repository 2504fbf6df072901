"""Index jobs: bulk loading that returns at once, fans out to embedding workers and survives restarts.

A job reads a JSONL source (a file on the server, or documents a client uploaded, which are spooled
to <data_dir>/jobs/uploads/ and fsynced before the upload is acknowledged) in batches of
`batch_size` non-blank lines. Bad lines go to the job's error list with their line numbers; each
batch's valid documents are embedded (server/jobs/embed.py: Celery `embed` workers, or in-process without
Redis) and committed by the server, the single writer, through `Engine.upsert_embedded`.

Ordering. Up to SIEVE_JOB_MAX_INFLIGHT_BATCHES batches of a job are embedded at once, by as many workers
as there are, but batches are committed strictly in source order, and within a batch the last line with
an id wins. So a job's result is as if its lines were written one at a time in file order: the last
line with an id wins. Jobs on one collection run one at a time, in the order they were started; other
writes to the collection (UpsertDocuments) interleave with a job's batches, each batch being atomic.

Durability (state in <data_dir>/jobs.db, server/jobs/job_store.py). After each batch is committed the job
records its position (byte offset and line of the next line), counters and the batch's bad lines in
one transaction. After a restart every job that was queued or running resumes from its position (the
batch that was in flight is read and committed again, which is idempotent), unless it cannot: its
source file is gone or changed, or its collection was deleted; then it is marked FAILED with the
reason. A job is never reported SUCCEEDED before every line was committed or recorded as an error.

Cancelling stops dispatch, drops the batches in flight, and keeps what was committed: every line up to
`committed_through_line` and nothing after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from server.core import validation
from server.core.engine import Engine
from server.jobs.embed import Embedded, EmbedFailed, InProcessEmbedder, Pending, Stopped, WorkerEmbedder
from server.jobs.job_store import (
    CANCELLED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    JobStore,
    LineError,
    now,
)
from server.jobs.source import Batch, SourceReader, count_lines, file_identity
from server.jobs.upload import UploadChunk, check_format, remove_partial, spool_upload
from sieve_core.config import Settings
from sieve_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SieveError,
    Unavailable,
)
from sieve_core.token_format import TokenFormat

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
HEARTBEAT_S = 5.0  # a watcher hears from a running job at least this often (rate and ETA move)
CANCEL_WAIT_S = 10.0


@dataclass(frozen=True)
class JobView:
    """A job as the API shows it."""

    record: JobRecord
    docs_per_second: float = 0.0
    eta_seconds: float | None = None
    status: str = ""
    waiting_for_workers: bool = False
    batches_in_flight: int = 0


class Embedder(Protocol):
    name: str

    async def submit(self, ids: list[str], texts: list[str]) -> Pending: ...

    async def result(self, pending: Pending, job: LiveJob) -> dict[str, Any]: ...

    async def discard(self, pendings: list[Pending]) -> None: ...

    async def close(self) -> None: ...


class LiveJob:
    """A queued or running job's in-memory state; `record` is what is (or is about to be) on disk."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record
        self.status = ""
        self.waiting = False
        self.in_flight = 0
        self.cancel = False
        self.shutdown = False
        self.finishing = False  # its final state is being written
        self.task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        self._changed = asyncio.Event()
        self._samples: deque[tuple[float, int]] = deque()

    @property
    def stop_requested(self) -> bool:
        return self.cancel or self.shutdown

    def changed(self) -> asyncio.Event:
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def set_status(self, status: str, waiting_for_workers: bool) -> None:
        if (status, waiting_for_workers) != (self.status, self.waiting):
            self.status, self.waiting = status, waiting_for_workers
            self.notify()

    def count_retry(self) -> None:
        self.record.batch_retries += 1
        self.notify()

    def progressed(self) -> None:
        t = time.monotonic()
        self._samples.append((t, self.record.done + self.record.failed))
        while len(self._samples) > 2 and t - self._samples[1][0] > RATE_WINDOW_S:
            self._samples.popleft()
        self.notify()

    def rate(self) -> float:
        if self.record.state != RUNNING or len(self._samples) < 2:
            return 0.0
        t0, p0 = self._samples[0]
        # Up to now, not to the last commit: a stalled job's rate falls instead of staying frozen.
        elapsed = time.monotonic() - t0
        return (self._samples[-1][1] - p0) / elapsed if elapsed > 0 else 0.0

    def view(self) -> JobView:
        rate = self.rate()
        r = self.record
        eta = None
        if r.state == RUNNING and r.total is not None and rate > 0:
            eta = max(0, r.total - r.done - r.failed) / rate
        return JobView(copy.copy(r), rate, eta, self.status, self.waiting, self.in_flight)


def finished_view(record: JobRecord) -> JobView:
    rate = 0.0
    if record.state in FINAL and record.started_at and record.finished_at:
        elapsed = record.finished_at - record.started_at
        rate = (record.done + record.failed) / elapsed if elapsed > 0 else 0.0
    return JobView(record, rate)


class JobManager:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._db = JobStore(settings.data_dir / "jobs.db")
        self._uploads = settings.data_dir / "jobs" / "uploads"
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="sieve-jobs-db")
        self._files = ThreadPoolExecutor(2, thread_name_prefix="sieve-jobs-io")
        self._live: dict[str, LiveJob] = {}
        self._closing = False

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))

    async def _save(self, record: JobRecord, errors: list[LineError] | None = None) -> None:
        # A copy: the row must be one consistent state even if the loop moves on while the thread writes.
        await self._on(self._db_thread, self._db.save, copy.copy(record), errors or [])

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume the jobs a previous run left queued or running (after the engine has started)."""
        await self._on(self._files, remove_partial, self._uploads)
        for record in await self._on(self._db_thread, self._db.unfinished):
            live = LiveJob(record)
            self._live[record.id] = live
            if record.cancel_requested:
                await self._finish(live, CANCELLED, "cancelled while the server was stopped")
                continue
            if record.state == RUNNING:
                record.resumes += 1
                log.info("job %s: resuming at line %d", record.id, record.next_line)
            record.state = QUEUED
        self._schedule()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Pause running jobs at their next checkpoint (they stay RUNNING on disk and resume on restart)."""
        self._closing = True
        tasks = []
        for live in self._live.values():
            live.shutdown = True
            live.notify()
            if live.task is not None:
                tasks.append(live.task)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        self._db_thread.submit(self._db.close)
        await asyncio.to_thread(self._db_thread.shutdown, True)
        await asyncio.to_thread(self._files.shutdown, True)

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the server is shutting down")

    # -- starting jobs -----------------------------------------------------------------------------
    async def start_file_job(self, collection: str, path: str, fmt: int, batch_size: int) -> JobView:
        self._check_open()
        fmt = check_format(fmt)
        size = validation.job_batch_size(batch_size, self._settings)
        await self._engine.get_collection(collection)
        source = await self._on(self._files, self._resolve_source, path)
        file_size, mtime_ns = await self._on(self._files, file_identity, source)
        record = JobRecord(
            id=uuid.uuid4().hex[:16],
            collection=collection,
            source=str(source),
            path=str(source),
            upload=False,
            format=fmt,
            batch_size=size,
            file_size=file_size,
            file_mtime_ns=mtime_ns,
            created_at=now(),
        )
        return await self._add(record)

    def _resolve_source(self, path: str) -> Path:
        validation.job_path(path)
        shown = validation.shown(path, 200)
        source = Path(path)
        if not source.is_absolute():
            raise InvalidArgument(
                f"path {shown} is not absolute; it is read by the server, not the client"
                " (to send a local file, upload it: UploadIndexJob, `sieve index --upload`)"
            )
        try:
            if source.is_dir():
                if not (source / "corpus.jsonl").is_file():
                    raise InvalidArgument(f"{shown} is a directory without a corpus.jsonl")
                source = source / "corpus.jsonl"
            if not source.is_file():
                raise InvalidArgument(
                    f"{shown} is not a file on the server (to send a local file, upload it: UploadIndexJob,"
                    " `sieve index --upload`)"
                )
            real = source.resolve()
            allowed = [
                Path(d.strip()).resolve() for d in self._settings.job_source_dirs.split(",") if d.strip()
            ]
            if allowed and not any(real.is_relative_to(d) for d in allowed):
                raise InvalidArgument(
                    f"{shown} is outside the directories jobs may read (SIEVE_JOB_SOURCE_DIRS)"
                )
            with real.open("rb"):
                pass
        except OSError as exc:
            # e.g. a name too long for the file system, or a directory the server may not search
            raise InvalidArgument(f"the server cannot read {shown}: {exc.strerror}") from None
        return real

    async def upload_job(self, chunks: AsyncIterator[UploadChunk]) -> JobView:
        """Spool an uploaded stream (documents, or raw JSONL) durably, then start a job over it."""
        self._check_open()
        job_id = uuid.uuid4().hex[:16]
        spooled = await spool_upload(
            chunks,
            self._uploads / f"{job_id}.jsonl",
            self._settings,
            self._engine.get_collection,
            partial(self._on, self._files),
            self._check_open,
        )
        record = JobRecord(
            id=job_id,
            collection=spooled.collection,
            source="upload",
            path=str(spooled.path),
            upload=True,
            format=spooled.format,
            batch_size=spooled.batch_size,
            file_size=spooled.file_size,
            file_mtime_ns=spooled.mtime_ns,
            total=spooled.total,
            created_at=now(),
        )
        try:
            return await self._add(record)
        except BaseException:
            await self._on(self._files, partial(spooled.path.unlink, missing_ok=True))
            raise

    async def _add(self, record: JobRecord) -> JobView:
        self._check_open()
        await self._on(self._db_thread, self._db.create, copy.copy(record))
        live = LiveJob(record)
        self._live[record.id] = live
        log.info(
            "job %s: %s -> collection %r (batches of %d)",
            record.id,
            record.source,
            record.collection,
            record.batch_size,
        )
        self._schedule()
        return live.view()

    def _schedule(self) -> None:
        """Start queued jobs in the order they were created: one per collection, SIEVE_JOB_MAX_CONCURRENT in all."""
        if self._closing:
            return
        running = [j for j in self._live.values() if j.task is not None]
        busy = {j.record.collection for j in running}
        queued = sorted(
            (j for j in self._live.values() if j.task is None and j.record.state == QUEUED),
            key=lambda j: (j.record.created_at, j.record.id),
        )
        for live in queued:
            ahead = next((j for j in running if j.record.collection == live.record.collection), None)
            if ahead is not None or live.record.collection in busy:
                who = f"job {ahead.record.id}" if ahead is not None else "an earlier job"
                live.set_status(f"queued behind {who} on the same collection", False)
                continue
            if len(running) >= self._settings.job_max_concurrent:
                live.set_status(f"queued: {len(running)} jobs are running (SIEVE_JOB_MAX_CONCURRENT)", False)
                busy.add(live.record.collection)  # later jobs on this collection must not overtake it
                continue
            live.set_status("", False)
            busy.add(live.record.collection)
            running.append(live)
            live.task = asyncio.create_task(self._run(live), name=f"sieve-job-{live.record.id}")

    # -- reading -----------------------------------------------------------------------------------
    async def _record(self, job_id: str) -> JobRecord:
        validation.job_id(job_id)
        record = await self._on(self._db_thread, self._db.get, job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return record  # type: ignore[no-any-return]

    async def get(
        self, job_id: str, errors_after_line: int = 0, max_errors: int = 100
    ) -> tuple[JobView, list[LineError], int]:
        self._check_open()
        validation.job_id(job_id)
        if not 0 <= max_errors <= 10_000 or errors_after_line < 0:
            raise InvalidArgument("max_errors must be between 0 and 10000 and errors_after_line 0 or more")
        live = self._live.get(job_id)
        view = live.view() if live is not None else finished_view(await self._record(job_id))
        limit = max_errors or 100
        errors = await self._on(self._db_thread, self._db.errors, job_id, errors_after_line, limit + 1)
        more = len(errors) > limit
        errors = errors[:limit]
        return view, errors, errors[-1].line if more else 0

    async def list(self, collection: str = "", limit: int = 100) -> list[JobView]:
        self._check_open()
        if collection:
            validation.collection_name(collection)
        if not 0 <= limit <= 1000:
            raise InvalidArgument(f"limit must be between 0 and 1000, got {limit}")
        records = await self._on(self._db_thread, self._db.list, collection, limit or 100)
        out = []
        for record in records:
            live = self._live.get(record.id)
            out.append(live.view() if live is not None else finished_view(record))
        return out

    async def watch(self, job_id: str, min_interval_ms: int = 0) -> AsyncIterator[JobView]:
        """The job now, then on every change (at most every min_interval), until it ends."""
        self._check_open()
        validation.job_id(job_id)
        interval = max(0.05, (min_interval_ms or 500) / 1000)
        while True:
            live = self._live.get(job_id)
            if live is None:
                view = finished_view(await self._record(job_id))
                yield view
                if view.record.state in FINAL:
                    return
                raise Unavailable("the job is not loaded on this server (it is starting or stopping); retry")
            changed = live.changed()
            view = live.view()
            sent = time.monotonic()
            yield view
            if view.record.state in FINAL:
                return
            if self._closing:
                raise Unavailable("the server is shutting down; the job resumes when it restarts")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - sent)))

    async def cancel(self, job_id: str) -> JobView:
        self._check_open()
        validation.job_id(job_id)
        live = self._live.get(job_id)
        if live is not None and live.finishing:  # it is ending anyway: answer with how it ended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.finished.wait(), CANCEL_WAIT_S)
            live = self._live.get(job_id)
        if live is None:
            record = await self._record(job_id)
            if record.state == CANCELLED:
                return finished_view(record)
            raise FailedPrecondition(f"job {job_id} has already {record.state}; there is nothing to cancel")
        live.record.cancel_requested = True
        if live.task is None:
            await self._finish(live, CANCELLED, "cancelled before it started")
            return finished_view(live.record)
        live.cancel = True
        live.notify()
        await self._save(live.record)  # a restart before the runner stops still honours the cancel
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.finished.wait(), CANCEL_WAIT_S)
        return live.view() if job_id in self._live else finished_view(live.record)

    # -- running -----------------------------------------------------------------------------------
    async def _run(self, live: LiveJob) -> None:
        record = live.record
        try:
            await self._execute(live)
        except asyncio.CancelledError:
            raise  # shutdown: the job stays RUNNING on disk and resumes on restart
        except (SieveError, EmbedFailed, OSError) as exc:
            reason = exc.message if isinstance(exc, SieveError) else str(exc)
            if isinstance(exc, OSError):
                reason = f"cannot read the source: {exc}"
            await self._finish(live, FAILED, f"{reason}; committed through line {record.next_line - 1}")
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("job %s failed (incident %s)", record.id, incident)
            await self._finish(
                live,
                FAILED,
                f"internal error (incident {incident}); committed through line {record.next_line - 1}",
            )
        finally:
            live.finished.set()
            if record.state in FINAL:
                self._live.pop(record.id, None)
            live.notify()
            self._schedule()

    async def _execute(self, live: LiveJob) -> None:
        record, s = live.record, self._settings
        info = await self._engine.get_collection(record.collection)  # NotFound: it was deleted
        source = Path(record.path)
        if not await self._on(self._files, source.is_file):
            raise FailedPrecondition(f"the source {record.source} no longer exists on the server")
        if await self._on(self._files, file_identity, source) != (record.file_size, record.file_mtime_ns):
            raise FailedPrecondition(f"the source {record.source} changed since the job started")
        # As UpsertDocuments does: a collection that stores token vectors gets them with its documents,
        # from the worker that embeds the batch (the same encoder pass, or its ColBERT bundle's).
        token_format, token_model = self._engine.token_plan(record.collection)
        embedder = self._embedder(info.embedding_model, token_format, token_model, record.id)
        record.state, record.embedder = RUNNING, embedder.name
        record.started_at = record.started_at or now()
        await self._save(record)
        if record.total is None:
            live.set_status("counting the source's lines", False)
            record.total = await self._on(self._files, count_lines, source, s.job_max_line_bytes)
            live.set_status("", False)
            await self._save(record)
        live.progressed()
        reader = await self._on(
            self._files, SourceReader, source, record.format, s, record.next_offset, record.next_line
        )
        collection_id = (await self._on(self._files, self._engine.store.get_collection, record.collection)).id
        in_flight: deque[tuple[Batch, Pending]] = deque()
        completed = False
        try:
            eof = False
            while True:
                # Keep up to max_inflight batches with the workers (backpressure: no more are read).
                while not eof and not live.stop_requested and len(in_flight) < s.job_max_inflight_batches:
                    batch = await self._on(self._files, reader.read_batch, record.batch_size)
                    if batch is None:
                        eof = True
                        break
                    unchanged: set[str] = set()
                    if batch.docs:  # texts already stored as they are need no vectors (a replayed batch)
                        unchanged = await self._on(
                            self._files, self._engine.store.unchanged_ids, collection_id, batch.docs
                        )
                    todo = [d for d in batch.docs if d.id not in unchanged]
                    in_flight.append(
                        (batch, await embedder.submit([d.id for d in todo], [d.text for d in todo]))
                    )
                    live.in_flight = len(in_flight)
                if not in_flight:
                    completed = eof
                    break
                if live.stop_requested:
                    break
                batch, pending = in_flight[0]
                try:
                    vectors = await self._vectors(embedder, pending, batch, live)
                except Stopped:
                    break
                in_flight.popleft()
                live.in_flight = len(in_flight)
                await self._commit(live, batch, vectors)
                if record.state == FAILED:
                    break
        finally:
            live.in_flight = 0
            await embedder.discard([p for _, p in in_flight])
            await embedder.close()
            await self._on(self._files, reader.close)
        if record.state == FAILED:
            await self._finish(live, FAILED, record.reason)
        elif completed:  # every line is committed or recorded, even if a cancel came too late to matter
            await self._finish(live, SUCCEEDED, "")
        elif live.cancel:
            await self._finish(live, CANCELLED, f"cancelled; committed through line {record.next_line - 1}")
        else:
            await self._save(record)  # paused by shutdown: RUNNING on disk, resumed on restart

    async def _vectors(
        self, embedder: Embedder, pending: Pending, batch: Batch, live: LiveJob
    ) -> dict[str, Any]:
        """The batch's vectors. If its embedding task keeps failing, find the line at fault: the documents
        the task cannot embed move from the batch to its errors, and the rest goes on."""
        try:
            return await embedder.result(pending, live)
        except EmbedFailed as exc:
            if not exc.by_content:
                raise
            vectors, bad = await self._isolate(embedder, pending.ids, pending.texts, str(exc), live)
        batch.docs = [d for d in batch.docs if d.id not in bad]
        batch.valid_lines -= len(bad)
        for doc_id, reason in bad.items():
            batch.errors.append(LineError(batch.lines[doc_id], doc_id, f"embedding failed: {reason}"[:500]))
        batch.errors.sort(key=lambda e: e.line)
        return vectors

    async def _isolate(
        self, embedder: Embedder, ids: list[str], texts: list[str], reason: str, live: LiveJob
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Bisect a failing batch: each half is tried once; a failing single document is a bad line. If both
        halves fail it is not one bad document but the workers (or several): the job fails."""
        if len(ids) == 1:
            return {}, {ids[0]: reason}
        mid = len(ids) // 2
        vectors: dict[str, Any] = {}
        failing: list[tuple[list[str], list[str], EmbedFailed]] = []
        for part_ids, part_texts in ((ids[:mid], texts[:mid]), (ids[mid:], texts[mid:])):
            pending = await embedder.submit(part_ids, part_texts)
            pending.attempts = self._settings.job_batch_retries  # one try
            try:
                vectors.update(await embedder.result(pending, live))
            except EmbedFailed as exc:
                if not exc.by_content:
                    raise
                failing.append((part_ids, part_texts, exc))
        if len(failing) == 2 and not all(f[2].refused for f in failing):
            raise EmbedFailed(
                f"a batch fails in both halves, so not because of one document: {reason}", False
            )
        bad: dict[str, str] = {}
        for part_ids, part_texts, part_exc in failing:
            more, part_bad = await self._isolate(embedder, part_ids, part_texts, str(part_exc), live)
            vectors.update(more)
            bad.update(part_bad)
        return vectors, bad

    async def _commit(self, live: LiveJob, batch: Batch, embedded: dict[str, Embedded]) -> None:
        record = live.record
        if batch.docs:
            vectors = {i: e.vector for i, e in embedded.items()}
            tokens = {i: e.tokens for i, e in embedded.items() if e.tokens is not None}
            result = await self._engine.upsert_embedded(record.collection, batch.docs, vectors, tokens)
            record.generation = result.generation
        record.done += batch.valid_lines
        record.failed += len(batch.errors)
        record.next_offset, record.next_line = batch.end_offset, batch.last_line + 1
        if record.failed > self._settings.job_max_errors:
            record.state = FAILED
            record.reason = (
                f"more than {self._settings.job_max_errors} bad lines (SIEVE_JOB_MAX_ERRORS); stopped after line "
                f"{batch.last_line}: is this the right file and format?"
            )
        await self._save(record, batch.errors)
        live.progressed()

    def _embedder(
        self, model: str, token_format: TokenFormat | None, token_model: str | None, job_id: str
    ) -> Embedder:
        if self._settings.redis_url is None:
            # Zero-shot token vectors from the same run; a ColBERT bundle's stay pending for the backfill.
            fmt = token_format if token_model is None else None
            return InProcessEmbedder(partial(self._engine.models.get, model), self._settings, fmt)
        return WorkerEmbedder(self._settings, model, token_format, token_model, job_id)

    async def _finish(self, live: LiveJob, state: str, reason: str) -> None:
        live.finishing = True
        record = live.record
        final = copy.copy(record)
        final.state, final.reason, final.finished_at = state, reason, now()
        await self._save(final)  # on disk before anyone hears of it
        record.state, record.reason, record.finished_at = final.state, final.reason, final.finished_at
        live.status, live.waiting = "", False
        if record.upload:
            await self._on(self._files, partial(Path(record.path).unlink, missing_ok=True))
        log.info(
            "job %s: %s (%d done, %d failed of %s; generation %d)%s",
            record.id,
            state,
            record.done,
            record.failed,
            record.total,
            record.generation,
            f": {reason}" if reason else "",
        )
        # Saved first: a watcher that no longer finds the job here reads its final state from disk.
        self._live.pop(record.id, None)
        live.finished.set()
        live.notify()
