"""Durable state of index jobs: SQLite (WAL, synchronous=FULL) in <data_dir>/jobs.db.

A job row holds what the job was asked to do, where it is (the byte offset and line number of the first
line not yet committed) and its counters; `job_errors` is its dead-letter list, one row per bad line.
A checkpoint (counters, offset, the batch's bad lines) is one transaction, written after the batch's
documents are committed to the collection: a crash between the two replays that batch on resume, which
is harmless because commits are idempotent by id and errors are keyed by line.

The file is separate from the document store (sieve.db) so that job bookkeeping never waits on, or
holds up, the store's write lock. One thread uses it (the job manager's executor).
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

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
    finished_at REAL
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


_COLUMNS = [f.name for f in fields(JobRecord)]


@dataclass(frozen=True)
class LineError:
    line: int
    doc_id: str
    reason: str


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def create(self, job: JobRecord) -> None:
        marks = ", ".join("?" * len(_COLUMNS))
        self._conn.execute(
            f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})",
            [getattr(job, c) for c in _COLUMNS],
        )

    def get(self, job_id: str) -> JobRecord | None:
        row = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def list(self, collection: str = "", limit: int = 100) -> list[JobRecord]:
        where, params = ("WHERE collection = ?", [collection]) if collection else ("", [])
        rows = self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY created_at DESC, id LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [_record(r) for r in rows]

    def unfinished(self) -> builtins.list[JobRecord]:
        rows = self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state IN (?, ?) ORDER BY created_at, id",
            (QUEUED, RUNNING),
        ).fetchall()
        return [_record(r) for r in rows]

    def save(self, job: JobRecord, errors: Sequence[LineError] = ()) -> None:
        """Write the whole row, and the batch's bad lines, in one transaction."""
        columns = [c for c in _COLUMNS if c != "id"]
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(
                f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                [*(getattr(job, c) for c in columns), job.id],
            )
            self._conn.executemany(
                "INSERT OR IGNORE INTO job_errors (job_id, line, doc_id, reason) VALUES (?, ?, ?, ?)",
                [(job.id, e.line, e.doc_id, e.reason) for e in errors],
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def errors(self, job_id: str, after_line: int, limit: int) -> builtins.list[LineError]:
        rows = self._conn.execute(
            "SELECT line, doc_id, reason FROM job_errors WHERE job_id = ? AND line > ? ORDER BY line LIMIT ?",
            (job_id, after_line, limit),
        ).fetchall()
        return [LineError(*r) for r in rows]


def _record(row: tuple) -> JobRecord:
    job = JobRecord(*row)
    job.upload = bool(job.upload)
    job.cancel_requested = bool(job.cancel_requested)
    return job


def now() -> float:
    return time.time()
