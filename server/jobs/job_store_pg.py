"""The job tables in the PostgreSQL store's database (SIEVE_STORE_URL): every server sharing it sees every job.

Same rows and SQL as the SQLite file (server/jobs/job_store.py), with PostgreSQL's types (BIGINT for counts
and byte offsets, DOUBLE PRECISION for times). Its own connection, autocommit outside `save`'s transaction,
synchronous_commit on: a job's checkpoint is durable when `save` returns, as in the file. No advisory lock:
job rows are written by their owner only (and `cancel_requested` by anyone), so they need not wait on the
store's writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from server.jobs.job_store import JobStore
from server.storage.postgres_db import WRITE_LOCK, PgConnection, pg_errors

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    upload INTEGER NOT NULL,
    format INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    file_size BIGINT NOT NULL,
    file_mtime_ns BIGINT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    total BIGINT,
    done BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    next_line BIGINT NOT NULL,
    generation BIGINT NOT NULL,
    cancel_requested INTEGER NOT NULL,
    batch_retries INTEGER NOT NULL,
    resumes INTEGER NOT NULL,
    embedder TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, state);
CREATE TABLE IF NOT EXISTS job_errors (
    job_id TEXT NOT NULL,
    line BIGINT NOT NULL,
    doc_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, line)
);
"""


class PgJobStore(JobStore):
    def __init__(self, url: str, owner: str) -> None:
        self.owner = owner
        self._url = url
        self._conn = self._connect()
        with self._transaction() as tx:  # under the store's lock: servers starting together create it once
            tx.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
            for statement in [s for s in SCHEMA.split(";") if s.strip()]:
                tx.execute(statement)

    def _connect(self) -> PgConnection:
        with pg_errors():
            raw = psycopg.connect(self._url, autocommit=True, options="-c synchronous_commit=on")
        return PgConnection(raw)

    def _live(self) -> PgConnection:
        """The connection, made again if the database went away (the failed call raised UNAVAILABLE)."""
        if self._conn.raw.closed or self._conn.raw.broken:
            self._conn.raw.close()
            self._conn = self._connect()
        return self._conn

    def _execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self._live().execute(sql, params)

    @contextmanager
    def _transaction(self) -> Iterator[PgConnection]:
        conn = self._live()
        with pg_errors(), conn.raw.transaction():
            yield conn

    def close(self) -> None:
        self._conn.raw.close()
