"""The job tables in the PostgreSQL store's database (SIEVE_STORE_URL): every server sharing it sees every job.

Same tables and SQL as the SQLite file (server/jobs/job_store.py), in PostgreSQL's types (BIGINT for counts
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

from server.jobs import job_store
from server.jobs.job_store import JobStore
from server.storage.postgres_db import WRITE_LOCK, PgConnection, pg_errors

# The file's tables in PostgreSQL's types: counts and byte offsets past 32 bits, times to the microsecond.
SCHEMA = (
    job_store.SCHEMA.replace(" WITHOUT ROWID", "")
    .replace("INTEGER", "BIGINT")
    .replace("REAL", "DOUBLE PRECISION")
) + "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, state);"


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
