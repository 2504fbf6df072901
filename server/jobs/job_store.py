"""Durable state of index jobs: SQLite (WAL, synchronous=FULL) in <data_dir>/jobs.db, or, when the store is
PostgreSQL (SIEVE_STORE_URL), tables `jobs` and `job_errors` in that database (server/jobs/job_store_pg.py),
where every server sharing it sees every job.

A job row holds what the job was asked to do, where it is (the byte offset and line number of the first
line not yet committed) and its counters; `job_errors` is its dead-letter list, one row per bad line.
A checkpoint (counters, offset, the batch's bad lines) is one transaction, written after the batch's
documents are committed to the collection: a crash between the two replays that batch on resume, which
is harmless because commits are idempotent by id and errors are keyed by line.

The file is separate from the document store (sieve.db) so that job bookkeeping never waits on, or
holds up, the store's write lock (on PostgreSQL the job tables take no advisory lock, for the same reason).
One thread uses it (the job manager's executor).

A job is run by one server, its `owner` (the id in that server's data directory, server/jobs/registry.py):
its source (a file on that server, or an upload spooled in its data directory) is there, and so it resumes
there after a restart. Other servers sharing a PostgreSQL store answer GetJob, ListJobs and WatchJob from
the row, and a CancelJob sent to them sets `cancel_requested` in the row, which the owner acts on (the
flag, once set, is never cleared by the owner's own checkpoints: see `save`).
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL = (SUCCEEDED, FAILED, CANCELLED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    upload INTEGER NOT NULL,
    format INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    file_size INTEGER NOT NULL,
    file_mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    total INTEGER,
    done INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    next_line INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL,
    batch_retries INTEGER NOT NULL,
    resumes INTEGER NOT NULL,
    embedder TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS job_errors (
    job_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, line)
) WITHOUT ROWID;
"""


@dataclass
class JobRecord:
    """One row of `jobs`. `next_offset`/`next_line`: the first line not yet committed (1-based)."""

    id: str
    collection: str
    source: str  # what the caller named: a file path, or "upload"
    path: str  # the file read (an upload's spool file)
    upload: bool
    format: int  # sieve.v1.SourceFormat value
    batch_size: int
    file_size: int
    file_mtime_ns: int
    state: str = QUEUED
    reason: str = ""
    total: int | None = None
    done: int = 0
    failed: int = 0
    next_offset: int = 0
    next_line: int = 1
    generation: int = 0
    cancel_requested: bool = False
    batch_retries: int = 0
    resumes: int = 0
    embedder: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    owner: str = ""  # the server that runs it (see the module docstring)


_COLUMNS = [f.name for f in fields(JobRecord)]


@dataclass(frozen=True)
class LineError:
    line: int
    doc_id: str
    reason: str


class JobStore:
    """The job tables, in SQL both dialects accept; a subclass supplies the connection and transactions.
    `owner`: the id of the server using it."""

    owner: str

    def _execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[Any]:
        """A write transaction whose `execute`/`executemany` take the same SQL."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def create(self, job: JobRecord) -> None:
        marks = ", ".join("?" * len(_COLUMNS))
        self._execute(
            f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})",
            [_value(getattr(job, c)) for c in _COLUMNS],
        )

    def get(self, job_id: str) -> JobRecord | None:
        row = self._execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def list(self, collection: str = "", limit: int = 100) -> list[JobRecord]:
        where, params = ("WHERE collection = ?", [collection]) if collection else ("", [])
        rows = self._execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY created_at DESC, id LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [_record(r) for r in rows]

    def unfinished(self) -> builtins.list[JobRecord]:
        """The queued and running jobs this server runs."""
        rows = self._execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state IN (?, ?) AND owner = ? ORDER BY created_at, id",
            (QUEUED, RUNNING, self.owner),
        ).fetchall()
        return [_record(r) for r in rows]

    def cancels_requested(self) -> builtins.list[str]:
        """The ids of this server's unfinished jobs that another server was asked to cancel."""
        rows = self._execute(
            "SELECT id FROM jobs WHERE cancel_requested = 1 AND state IN (?, ?) AND owner = ?",
            (QUEUED, RUNNING, self.owner),
        ).fetchall()
        return [r[0] for r in rows]

    def request_cancel(self, job_id: str) -> bool:
        """Asks the job's owner to cancel it; False if it has already ended."""
        cursor = self._execute(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state IN (?, ?)", (job_id, QUEUED, RUNNING)
        )
        return bool(cursor.rowcount)

    def save(self, job: JobRecord, errors: Sequence[LineError] = ()) -> None:
        """Write the whole row, and the batch's bad lines, in one transaction. A cancel requested in the row
        (by another server) stays requested whatever the record says."""
        columns = [c for c in _COLUMNS if c not in ("id", "cancel_requested")]
        with self._transaction() as tx:
            tx.execute(
                f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)},"
                " cancel_requested = CASE WHEN cancel_requested = 1 THEN 1 ELSE ? END WHERE id = ?",
                [*(_value(getattr(job, c)) for c in columns), int(job.cancel_requested), job.id],
            )
            if errors:
                tx.executemany(
                    "INSERT INTO job_errors (job_id, line, doc_id, reason) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    [(job.id, e.line, e.doc_id, e.reason) for e in errors],
                )

    def absent_owners(self) -> builtins.list[str]:
        """Other servers with unfinished jobs here that are not running (none for a file only this server
        uses; see job_store_pg.py)."""
        return []

    def fail_orphans(self, owner: str, reason: str) -> builtins.list[str]:
        return []

    def errors(self, job_id: str, after_line: int, limit: int) -> builtins.list[LineError]:
        rows = self._execute(
            "SELECT line, doc_id, reason FROM job_errors WHERE job_id = ? AND line > ? ORDER BY line LIMIT ?",
            (job_id, after_line, limit),
        ).fetchall()
        return [LineError(*r) for r in rows]


class SqliteJobStore(JobStore):
    """<data_dir>/jobs.db: this server's jobs only."""

    def __init__(self, path: Path, owner: str) -> None:
        self.owner = owner
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a jobs.db from before jobs had owners
            self._conn.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        # The file is in this server's data directory: every job in it is this server's (rows written
        # before jobs had owners, or before the directory had its id, have none).
        self._conn.execute("UPDATE jobs SET owner = ? WHERE owner <> ?", (owner, owner))

    def _execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self._conn.execute(sql, params)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


def _value(value: object) -> object:
    return int(value) if isinstance(value, bool) else value  # the flags are INTEGER columns in both


def _record(row: tuple) -> JobRecord:
    job = JobRecord(*row)
    job.upload = bool(job.upload)
    job.cancel_requested = bool(job.cancel_requested)
    return job


def now() -> float:
    return time.time()
