"""The job tables in the PostgreSQL store's database (SIEVE_STORE_URL): every server sharing it sees every job.

Same tables and SQL as the SQLite file (server/jobs/job_store.py), in PostgreSQL's types (BIGINT for counts
and byte offsets, DOUBLE PRECISION for times). Its own connection, autocommit outside `save`'s transaction,
synchronous_commit on: a job's checkpoint is durable when `save` returns, as in the file. Job rows take no
write lock: they are written by their owner only (and `cancel_requested` by anyone), so they need not wait on
the store's writes.

While a server runs, its connection holds a session advisory lock on its id, (OWNER_LOCK, the id's hash): a
second server started on the same data directory (the same id) is refused, and the other servers can tell that
the owner of an unfinished job is gone (the lock is free: `absent_owners`) and, after
SIEVE_JOB_ORPHAN_AFTER_S, mark its jobs FAILED (`fail_orphans`, under the same lock, so a returning owner
either finds them failed or resumes them, never both).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from server.jobs import job_store
from server.jobs.job_store import FAILED, QUEUED, RUNNING, JobStore, now
from server.storage.postgres_db import WRITE_LOCK, PgConnection, pg_errors
from sieve_core.errors import FailedPrecondition

log = logging.getLogger(__name__)

# First key of pg_advisory_lock(OWNER_LOCK, hash of a server id), held by the running server ("SIEX").
OWNER_LOCK = 0x53494558
# How long a restarted server waits for its previous session's lock to go (a killed process's session ends
# when PostgreSQL sees its connection close, normally at once).
OWNER_WAIT_S = 30.0


def owner_key(owner: str) -> int:
    """A server id as the second key of its lock. Two ids sharing a key (1 in 2^32) hide each other's
    absence; one sharing this server's own key is never taken for gone (`absent_owners`), since this
    server's session would take the lock again whether the other runs or not."""
    return int.from_bytes(hashlib.blake2b(owner.encode(), digest_size=4).digest(), "big", signed=True)


# The file's tables in PostgreSQL's types: counts and byte offsets past 32 bits, times to the microsecond.
SCHEMA = (
    job_store.SCHEMA.replace(" WITHOUT ROWID", "")
    .replace("INTEGER", "BIGINT")
    .replace("REAL", "DOUBLE PRECISION")
) + "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, state);"


class PgJobStore(JobStore):
    def __init__(self, url: str, owner: str, wait_s: float = OWNER_WAIT_S) -> None:
        self.owner = owner
        self._url = url
        self._conn = self._connect()
        with self._transaction() as tx:  # under the store's lock: servers starting together create it once
            tx.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
            for statement in [s for s in SCHEMA.split(";") if s.strip()]:
                tx.execute(statement)
        deadline = time.monotonic() + wait_s
        while not self._hold_id():
            if time.monotonic() > deadline:
                self._conn.raw.close()
                raise FailedPrecondition(
                    f"another server is running with this data directory's id ({owner}, in its server-id "
                    "file) on the same PostgreSQL store: give each server its own data directory"
                )
            time.sleep(0.5)

    def _hold_id(self) -> bool:
        return _true(
            self._conn.execute("SELECT pg_try_advisory_lock(?, ?)", (OWNER_LOCK, owner_key(self.owner)))
        )

    def _connect(self) -> PgConnection:
        with pg_errors():
            raw = psycopg.connect(self._url, autocommit=True, options="-c synchronous_commit=on")
        return PgConnection(raw)

    def _live(self) -> PgConnection:
        """The connection, made again if the database went away (the failed call raised UNAVAILABLE)."""
        if self._conn.raw.closed or self._conn.raw.broken:
            self._conn.raw.close()
            self._conn = self._connect()
            if not self._hold_id():  # only if another server took this id meanwhile
                log.warning("job store: could not take this server's id lock again (%s)", self.owner)
        return self._conn

    def absent_owners(self) -> list[str]:
        """The other servers with unfinished jobs that are not running now (their id lock is free)."""
        owners = self._execute(
            "SELECT DISTINCT owner FROM jobs WHERE state IN (?, ?) AND owner <> ?",
            (QUEUED, RUNNING, self.owner),
        ).fetchall()
        absent = []
        mine = owner_key(self.owner)
        for (owner,) in owners:
            key = owner_key(owner)
            if key == mine:
                continue  # session locks are re-entrant: trying it here would always succeed
            if _true(self._execute("SELECT pg_try_advisory_lock(?, ?)", (OWNER_LOCK, key))):
                self._execute("SELECT pg_advisory_unlock(?, ?)", (OWNER_LOCK, key))
                absent.append(owner)
        return absent

    def fail_orphans(self, owner: str, reason: str) -> list[str]:
        """Marks `owner`'s unfinished jobs FAILED if it is still not running; returns their ids."""
        with self._transaction() as tx:
            if not _true(
                tx.execute("SELECT pg_try_advisory_xact_lock(?, ?)", (OWNER_LOCK, owner_key(owner)))
            ):
                return []  # it came back
            rows = tx.execute(
                "UPDATE jobs SET state = ?, reason = ?, finished_at = ? WHERE owner = ? AND state IN (?, ?)"
                " RETURNING id",
                (FAILED, reason, now(), owner, QUEUED, RUNNING),
            ).fetchall()
        return [r[0] for r in rows]

    def _execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self._live().execute(sql, params)

    @contextmanager
    def _transaction(self) -> Iterator[PgConnection]:
        conn = self._live()
        with pg_errors(), conn.raw.transaction():
            yield conn

    def close(self) -> None:
        self._conn.raw.close()


def _true(cursor: Any) -> bool:
    row = cursor.fetchone()
    return row is not None and bool(row[0])
