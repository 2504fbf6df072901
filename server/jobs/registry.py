"""Every job the server knows: queued and running ones in memory (`live`), all of them in <data_dir>/jobs.db.

Writes to the job store happen in one thread of its own, each as one consistent copy of the record.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from server.jobs.job_store import JobRecord, JobStore, LineError, now
from server.jobs.live import JobView, LiveJob, finished_view
from sieve_core.config import Settings
from sieve_core.errors import NotFound

log = logging.getLogger(__name__)


async def run_on(executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))


class JobRegistry:
    def __init__(self, settings: Settings, files: ThreadPoolExecutor) -> None:
        self._db = JobStore(settings.data_dir / "jobs.db")
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

    async def record(self, job_id: str) -> JobRecord:
        record = await self._on_db(self._db.get, job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return record

    async def view(self, job_id: str) -> JobView:
        """The job now: live if it is queued or running, else as it ended (NotFound if there is none)."""
        live = self.live.get(job_id)
        return live.view() if live is not None else finished_view(await self.record(job_id))

    async def errors(self, job_id: str, after_line: int, limit: int) -> list[LineError]:
        return await self._on_db(self._db.errors, job_id, after_line, limit)

    async def views(self, collection: str, limit: int) -> list[JobView]:
        out = []
        for record in await self._on_db(self._db.list, collection, limit):
            live = self.live.get(record.id)
            out.append(live.view() if live is not None else finished_view(record))
        return out

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
