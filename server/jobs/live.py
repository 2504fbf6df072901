"""A job as the API shows it (JobView), and a queued or running job's in-memory state (LiveJob)."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import deque
from dataclasses import dataclass

from server.jobs.job_store import FINAL, RUNNING, JobRecord

RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class JobView:
    """A job as the API shows it."""

    record: JobRecord
    docs_per_second: float = 0.0
    eta_seconds: float | None = None
    status: str = ""
    waiting_for_workers: bool = False
    batches_in_flight: int = 0


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
