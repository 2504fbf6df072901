"""Index jobs: bulk loading that returns at once, fans out to embedding workers and survives restarts.

A job reads a JSONL source (a file on the server, or documents a client uploaded, which are spooled
to <data_dir>/jobs/uploads/ and fsynced before the upload is acknowledged) in batches of
`batch_size` non-blank lines. Bad lines go to the job's error list with their line numbers; each
batch's valid documents are embedded (by Celery `embed` workers, server/jobs/embed_workers.py, or
in-process without Redis, server/jobs/embed.py) and committed by the server, the single writer, through
`Engine.upsert_embedded`.

Ordering. Up to SIEVE_JOB_MAX_INFLIGHT_BATCHES batches of a job are embedded at once, by as many workers
as there are, but batches are committed strictly in source order, and within a batch the last line with
an id wins. So a job's result is as if its lines were written one at a time in file order: the last
line with an id wins. Jobs on one collection run one at a time, in the order they were started; other
writes to the collection (UpsertDocuments) interleave with a job's batches, each batch being atomic.

Durability (state in <data_dir>/jobs.db, or the PostgreSQL store's database, server/jobs/job_store.py, kept by
server/jobs/registry.py). After each batch is committed the job
records its position (byte offset and line of the next line), counters and the batch's bad lines in
one transaction. After a restart every job that was queued or running resumes from its position (the
batch that was in flight is read and committed again, which is idempotent), unless it cannot: its
source file is gone or changed, or its collection was deleted; then it is marked FAILED with the
reason. A job is never reported SUCCEEDED before every line was committed or recorded as an error.

Cancelling stops dispatch, drops the batches in flight, and keeps what was committed: every line up to
`committed_through_line` and nothing after it.

Several servers over one PostgreSQL store: a job runs (and resumes) on the server that started it; any of
them answers GetJob, ListJobs and WatchJob for it from the job tables, and CancelJob through another server
is recorded in the job's row and acted on by the server running it (within about STORED_POLL_S).

This module holds what the API calls (start, upload, get, list, watch, cancel) and the scheduling of jobs;
server/jobs/runner.py runs one job; server/jobs/registry.py keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from server.core import validation
from server.core.indexing import IndexingEngine
from server.jobs.job_store import CANCELLED, FINAL, QUEUED, RUNNING, JobRecord, LineError, now
from server.jobs.live import JobView, LiveJob, finished_view
from server.jobs.registry import CANCEL_WAIT_S, HEARTBEAT_S, STORED_POLL_S, JobRegistry, run_on
from server.jobs.runner import JobRunner
from server.jobs.source import file_identity, resolve_source
from server.jobs.upload import UploadChunk, check_format, remove_partial, remove_spools, spool_upload
from sieve_core.config import Settings
from sieve_core.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)


__all__ = ["JobManager", "JobView"]


class JobManager:
    def __init__(self, engine: IndexingEngine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._uploads = settings.data_dir / "jobs" / "uploads"
        self._files = ThreadPoolExecutor(2, thread_name_prefix="sieve-jobs-io")
        self._jobs = JobRegistry(settings, self._files)
        self._runner = JobRunner(engine, settings, self._jobs, self._files)
        self._closing = False
        self._others: asyncio.Task[None] | None = None

    async def _on_files(self, fn: Any, *args: Any) -> Any:
        return await run_on(self._files, fn, *args)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume the jobs a previous run left queued or running (after the engine has started)."""
        await self._on_files(remove_partial, self._uploads)
        for record in await self._jobs.unfinished():
            live = LiveJob(record)
            self._jobs.live[record.id] = live
            if record.cancel_requested:
                await self._jobs.finish(live, CANCELLED, "cancelled while the server was stopped")
                continue
            if record.state == RUNNING:
                record.resumes += 1
                log.info("job %s: resuming at line %d", record.id, record.next_line)
            record.state = QUEUED
        # Spools of upload jobs that ended while this server was away (another server failed them).
        await self._on_files(remove_spools, self._uploads, set(self._jobs.live))
        if self._settings.store_url is not None:  # other servers may be asked to cancel this one's jobs
            self._others = asyncio.create_task(self._follow_other_servers(), name="sieve-job-other-servers")
        self._schedule()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Pause running jobs at their next checkpoint (they stay RUNNING on disk and resume on restart)."""
        self._closing = True
        if self._others is not None:
            self._others.cancel()
        tasks = []
        for live in self._jobs.live.values():
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
        await self._jobs.close()
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
        source = await self._on_files(resolve_source, path, self._settings)
        file_size, mtime_ns = await self._on_files(file_identity, source)
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
            owner=self._jobs.owner,
        )
        return await self._add(record)

    async def upload_job(self, chunks: AsyncIterator[UploadChunk]) -> JobView:
        """Spool an uploaded stream (documents, or raw JSONL) durably, then start a job over it."""
        self._check_open()
        job_id = uuid.uuid4().hex[:16]
        spooled = await spool_upload(
            chunks,
            self._uploads / f"{job_id}.jsonl",
            self._settings,
            self._engine.get_collection,
            partial(run_on, self._files),
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
            owner=self._jobs.owner,
        )
        try:
            return await self._add(record)
        except BaseException:
            await self._on_files(partial(spooled.path.unlink, missing_ok=True))
            raise

    async def _add(self, record: JobRecord) -> JobView:
        self._check_open()
        live = await self._jobs.create(record)
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
        running = [j for j in self._jobs.live.values() if j.task is not None]
        busy = {j.record.collection for j in running}
        queued = sorted(
            (j for j in self._jobs.live.values() if j.task is None and j.record.state == QUEUED),
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
    async def get(
        self, job_id: str, errors_after_line: int = 0, max_errors: int = 100
    ) -> tuple[JobView, list[LineError], int]:
        self._check_open()
        validation.job_id(job_id)
        if not 0 <= max_errors <= 10_000 or errors_after_line < 0:
            raise InvalidArgument("max_errors must be between 0 and 10000 and errors_after_line 0 or more")
        view = await self._jobs.view(job_id)
        limit = max_errors or 100
        errors = await self._jobs.errors(job_id, errors_after_line, limit + 1)
        more = len(errors) > limit
        errors = errors[:limit]
        return view, errors, errors[-1].line if more else 0

    async def list(self, collection: str = "", limit: int = 100) -> list[JobView]:
        self._check_open()
        if collection:
            validation.collection_name(collection)
        if not 0 <= limit <= 1000:
            raise InvalidArgument(f"limit must be between 0 and 1000, got {limit}")
        return await self._jobs.views(collection, limit or 100)

    async def watch(self, job_id: str, min_interval_ms: int = 0) -> AsyncIterator[JobView]:
        """The job now, then on every change (at most every min_interval), until it ends."""
        self._check_open()
        validation.job_id(job_id)
        interval = max(0.05, (min_interval_ms or 500) / 1000)
        while True:
            live = self._jobs.live.get(job_id)
            if live is None:
                record = await self._jobs.record(job_id)
                if record.owner == self._jobs.owner and record.state not in FINAL:
                    raise Unavailable(
                        "the job is not loaded on this server (it is starting or stopping); retry"
                    )
                async for view in self._jobs.watch_stored(record, interval, self._check_open):
                    yield view
                return
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
        live = self._jobs.live.get(job_id)
        if live is not None and live.finishing:  # it is ending anyway: answer with how it ended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.finished.wait(), CANCEL_WAIT_S)
            live = self._jobs.live.get(job_id)
        if live is None:
            return await self._jobs.cancel_stored(await self._jobs.record(job_id))
        await self._cancel_live(live)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.finished.wait(), CANCEL_WAIT_S)
        return live.view() if job_id in self._jobs.live else finished_view(live.record)

    async def _cancel_live(self, live: LiveJob) -> None:
        live.record.cancel_requested = True
        if live.task is None:
            await self._jobs.finish(live, CANCELLED, "cancelled before it started")
            return
        live.cancel = True
        live.notify()
        await self._jobs.save(live.record)  # a restart before the runner stops still honours the cancel

    async def _follow_other_servers(self) -> None:
        """On a shared store: cancels other servers recorded for this server's jobs, acted on within about
        STORED_POLL_S; and other servers gone for SIEVE_JOB_ORPHAN_AFTER_S have their jobs failed."""
        orphan_after = self._settings.job_orphan_after_s
        orphan_every = max(STORED_POLL_S, min(30.0, orphan_after / 4))
        orphans_checked = time.monotonic()
        while not self._closing:
            await asyncio.sleep(STORED_POLL_S)
            try:
                if orphan_after and time.monotonic() - orphans_checked >= orphan_every:
                    orphans_checked = time.monotonic()
                    await self._jobs.fail_orphans(orphan_after)
                requested = await self._jobs.cancels_requested() if self._jobs.live else []
            except Unavailable:
                continue  # the database is away: the next look sees them
            except Exception:  # never let the loop die quietly: cancels through other servers depend on it
                log.exception("looking for jobs cancelled through other servers failed; trying again")
                continue
            for job_id in requested:
                live = self._jobs.live.get(job_id)
                if live is not None and not live.cancel and not live.finishing:
                    log.info("job %s: cancel requested through another server", job_id)
                    await self._cancel_live(live)

    # -- running -----------------------------------------------------------------------------------
    async def _run(self, live: LiveJob) -> None:
        try:
            await self._runner.run(live)
        finally:
            live.finished.set()
            if live.record.state in FINAL:
                self._jobs.live.pop(live.record.id, None)
            live.notify()
            self._schedule()
