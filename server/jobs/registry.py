"""Every job the server knows: queued and running ones in memory (`live`), all of them in the job store
(<data_dir>/jobs.db, or the PostgreSQL store's database, where other servers' jobs are too).

Writes to the job store happen in one thread of its own, each as one consistent copy of the record.

This server's id (`owner`), in <data_dir>/server-id, made once: the jobs it starts are its own to run and
resume, since their sources are on this machine (server/jobs/job_store.py).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from server.jobs.job_store import CANCELLED, FINAL, JobRecord, JobStore, LineError, SqliteJobStore, now
from server.jobs.live import JobView, LiveJob, finished_view
from sieve_core.config import Settings
from sieve_core.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # a watcher hears from a job at least this often
CANCEL_WAIT_S = 10.0  # a CancelJob waits this long for the job to stop
STORED_POLL_S = 0.5  # how often another server's job is read again (watch, cancel), and cancels looked for


async def run_on(executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))


def server_id(data_dir: Path) -> str:
    """This data directory's id, made (and made durable) the first time."""
    path = data_dir / "server-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    made = uuid.uuid4().hex[:12]
    partial_path = path.with_suffix(".tmp")
    with open(partial_path, "w") as fh:
        fh.write(made + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial_path, path)
    return made


def open_job_store(settings: Settings) -> JobStore:
    owner = server_id(settings.data_dir)
    if settings.store_url is None:
        return SqliteJobStore(settings.data_dir / "jobs.db", owner)
    from server.jobs.job_store_pg import PgJobStore  # psycopg is needed only when it is asked for

    return PgJobStore(settings.store_url.get_secret_value(), owner)


class JobRegistry:
    def __init__(self, settings: Settings, files: ThreadPoolExecutor) -> None:
        self._db = open_job_store(settings)
        self.owner = self._db.owner
        self._absent_since: dict[str, float] = {}  # other servers with unfinished jobs, seen gone since
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sieve-jobs-db")
        self._files = files
        self.live: dict[str, LiveJob] = {}

    async def _on_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await run_on(self._thread, fn, *args)

    async def save(self, record: JobRecord, errors: list[LineError] | None = None) -> None:
        # A copy: the row must be one consistent state even if the loop moves on while the thread writes.
        await self._on_db(self._db.save, copy.copy(record), errors or [])

    async def create(self, record: JobRecord) -> LiveJob:
        await self._on_db(self._db.create, copy.copy(record))
        live = LiveJob(record)
        self.live[record.id] = live
        return live

    async def unfinished(self) -> list[JobRecord]:
        return await self._on_db(self._db.unfinished)

    async def cancels_requested(self) -> list[str]:
        return await self._on_db(self._db.cancels_requested)

    async def fail_orphans(self, after_s: float) -> None:
        """Marks FAILED the unfinished jobs of other servers seen gone (their id lock free) for `after_s`."""
        absent = set(await self._on_db(self._db.absent_owners))
        t = time.monotonic()
        self._absent_since = {o: self._absent_since.get(o, t) for o in absent}
        for owner, since in list(self._absent_since.items()):
            if t - since < after_s:
                continue
            reason = (
                f"its server ({owner}) has been gone for {t - since:.0f} s (SIEVE_JOB_ORPHAN_AFTER_S); a job runs "
                "only on the server that started it, where its source is: start it again"
            )
            for job_id in await self._on_db(self._db.fail_orphans, owner, reason):
                log.warning("job %s: failed: %s", job_id, reason)
            del self._absent_since[owner]

    async def request_cancel(self, job_id: str) -> bool:
        return await self._on_db(self._db.request_cancel, job_id)

    async def record(self, job_id: str) -> JobRecord:
        record = await self._on_db(self._db.get, job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return record

    async def view(self, job_id: str) -> JobView:
        """The job now: live if it is queued or running, else as it ended (NotFound if there is none)."""
        live = self.live.get(job_id)
        return live.view() if live is not None else self.stored_view(await self.record(job_id))

    def stored_view(self, record: JobRecord) -> JobView:
        """A job not running here, as its row says: ended, or another server's."""
        view = finished_view(record)
        if record.owner != self.owner and record.state not in FINAL:
            view = dataclasses.replace(view, status=f"{record.state} on server {record.owner}")
        return view

    async def errors(self, job_id: str, after_line: int, limit: int) -> list[LineError]:
        return await self._on_db(self._db.errors, job_id, after_line, limit)

    async def views(self, collection: str, limit: int) -> list[JobView]:
        out = []
        for record in await self._on_db(self._db.list, collection, limit):
            live = self.live.get(record.id)
            out.append(live.view() if live is not None else self.stored_view(record))
        return out

    async def watch_stored(
        self, record: JobRecord, interval: float, check_open: Callable[[], None]
    ) -> AsyncIterator[JobView]:
        """A job this server does not run (another server's, on a shared store): its row, read again every
        STORED_POLL_S (or `interval`, if longer), sent when it changed or HEARTBEAT_S passed, until it ends."""
        sent_record, sent_at = None, 0.0
        while True:
            if record != sent_record or time.monotonic() - sent_at >= HEARTBEAT_S:
                sent_record, sent_at = record, time.monotonic()
                yield self.stored_view(record)
            if record.state in FINAL:
                return
            check_open()
            await asyncio.sleep(max(STORED_POLL_S, interval))
            record = await self.record(record.id)

    async def cancel_stored(self, record: JobRecord) -> JobView:
        """Cancels a job this server does not run: the row asks its owner to (JobManager._follow_other_servers), and the
        answer waits up to CANCEL_WAIT_S for the owner to stop it."""
        if record.state == CANCELLED:
            return finished_view(record)
        if record.state in FINAL or not await self.request_cancel(record.id):
            record = await self.record(record.id)
            if record.state == CANCELLED:
                return finished_view(record)
            raise FailedPrecondition(
                f"job {record.id} has already {record.state}; there is nothing to cancel"
            )
        deadline = time.monotonic() + CANCEL_WAIT_S
        while record.state not in FINAL and time.monotonic() < deadline:
            await asyncio.sleep(STORED_POLL_S)
            record = await self.record(record.id)
        return self.stored_view(record)

    async def finish(self, live: LiveJob, state: str, reason: str) -> None:
        live.finishing = True
        record = live.record
        final = copy.copy(record)
        final.state, final.reason, final.finished_at = state, reason, now()
        await self.save(final)  # on disk before anyone hears of it
        record.state, record.reason, record.finished_at = final.state, final.reason, final.finished_at
        live.status, live.waiting = "", False
        if record.upload:
            await run_on(self._files, partial(Path(record.path).unlink, missing_ok=True))
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
        self.live.pop(record.id, None)
        live.finished.set()
        live.notify()

    async def close(self) -> None:
        self._thread.submit(self._db.close)
        await asyncio.to_thread(self._thread.shutdown, True)
