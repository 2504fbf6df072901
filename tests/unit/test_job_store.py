"""The job store's contract on both backends (server/jobs/job_store.py, job_store_pg.py): rows as written,
checkpoints with their bad lines, owners, and cancels requested by another server that the owner's own
checkpoints do not undo."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.jobs.job_store import (
    FAILED,
    QUEUED,
    RUNNING,
    SCHEMA,
    SUCCEEDED,
    JobRecord,
    JobStore,
    LineError,
    SqliteJobStore,
)
from server.jobs.registry import server_id


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def record(job_id: str, owner: str, created_at: float = 1.0) -> JobRecord:
    return JobRecord(
        id=job_id,
        collection="c",
        source="upload",
        path="/spool/x.jsonl",
        upload=True,
        format=0,
        batch_size=10,
        file_size=5_000_000_000,  # past 32 bits: a byte count of a big source
        file_mtime_ns=1_733_000_000_123_456_789,
        created_at=created_at,
        owner=owner,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[JobStore, JobStore | None]]:
    """This server's job store, and another server's over the same tables (None for an SQLite file, which
    is one server's)."""
    if request.param == "sqlite":
        store = SqliteJobStore(tmp_path / "jobs.db", "server-a")
        yield store, None
        store.close()
        return
    from server.jobs.job_store_pg import PgJobStore

    url = request.getfixturevalue("pg_url")
    a, b = PgJobStore(url, "server-a"), PgJobStore(url, "server-b")
    yield a, b
    a.close()
    b.close()


def test_a_row_reads_back_as_written_and_checkpoints_keep_their_bad_lines(
    stores: tuple[JobStore, JobStore | None],
) -> None:
    store, _ = stores
    job = record("j1", store.owner, created_at=1_765_000_000.123456)
    store.create(job)
    assert store.get("j1") == job
    job.state, job.done, job.failed, job.next_offset, job.next_line = RUNNING, 20, 2, 4_000_000_001, 23
    store.save(job, [LineError(3, "a", "bad json"), LineError(9, "b", "no text")])
    store.save(job, [LineError(3, "a", "bad json")])  # a replayed batch: its errors are kept once
    assert store.get("j1") == job
    assert store.errors("j1", 0, 10) == [LineError(3, "a", "bad json"), LineError(9, "b", "no text")]
    assert store.errors("j1", 3, 10) == [LineError(9, "b", "no text")]
    assert store.get("nope") is None


def test_each_server_resumes_its_own_jobs_and_sees_every_job(
    stores: tuple[JobStore, JobStore | None],
) -> None:
    a, b = stores
    if b is None:
        pytest.skip("an SQLite job store is one server's")
    a.create(record("mine", "server-a", 1.0))
    b.create(record("theirs", "server-b", 2.0))
    assert [j.id for j in a.unfinished()] == ["mine"]
    assert [j.id for j in b.unfinished()] == ["theirs"]
    assert [j.id for j in a.list()] == ["theirs", "mine"]  # newest first, whoever runs it
    assert b.get("mine") == a.get("mine")


def test_a_cancel_requested_elsewhere_survives_the_owners_checkpoints(
    stores: tuple[JobStore, JobStore | None],
) -> None:
    a, b = stores
    other = b or a
    job = record("j", a.owner)
    job.state = RUNNING
    a.create(job)
    assert a.cancels_requested() == []
    assert other.request_cancel("j")
    job.done = 10  # the owner's next checkpoint, written from a record that has not heard of the cancel
    a.save(job)
    stored = a.get("j")
    assert stored is not None and stored.cancel_requested and stored.done == 10
    assert a.cancels_requested() == ["j"]
    job.state = SUCCEEDED
    a.save(job)
    assert a.cancels_requested() == []
    assert not other.request_cancel("j"), "a cancel was recorded for a job that had ended"


def test_an_old_jobs_file_gets_owners(tmp_path: Path) -> None:
    """A jobs.db written before jobs had owners opens, and its unfinished jobs are this server's."""
    path = tmp_path / "jobs.db"
    old_schema = SCHEMA.replace(",\n    owner TEXT NOT NULL DEFAULT ''", "")
    assert "owner" not in old_schema
    conn = sqlite3.connect(path)
    conn.executescript(old_schema)
    columns = [c for c in JobRecord.__dataclass_fields__ if c != "owner"]
    old = record("old", "")
    old.state = QUEUED
    conn.execute(
        f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        [int(v) if isinstance(v, bool) else v for v in (getattr(old, c) for c in columns)],
    )
    conn.commit()
    conn.close()
    store = SqliteJobStore(path, "here")
    assert [(j.id, j.owner) for j in store.unfinished()] == [("old", "here")]
    failed = store.get("old")
    assert failed is not None
    failed.state = FAILED
    store.save(failed)
    assert store.unfinished() == []
    store.close()


def test_a_data_directory_keeps_its_server_id(tmp_path: Path) -> None:
    first = server_id(tmp_path / "data")
    assert first and server_id(tmp_path / "data") == first
    assert server_id(tmp_path / "other") != first


def test_a_gone_servers_unfinished_jobs_can_be_failed_and_its_id_is_one_servers(pg_url: str) -> None:
    from server.jobs.job_store_pg import PgJobStore
    from sieve_core.errors import FailedPrecondition

    a, b = PgJobStore(pg_url, "server-a"), PgJobStore(pg_url, "server-b")
    job = record("j", "server-a")
    job.state = RUNNING
    a.create(job)
    finished = record("done", "server-a")
    finished.state = SUCCEEDED
    a.create(finished)
    with pytest.raises(FailedPrecondition, match="another server is running with this data directory's id"):
        PgJobStore(pg_url, "server-a", wait_s=0.5)
    assert b.absent_owners() == [], "a running server was taken for gone"
    a.close()  # server a stops (or is killed: its session ends, a moment later in PostgreSQL)
    assert eventually(lambda: b.absent_owners() == ["server-a"])
    back = PgJobStore(pg_url, "server-a", wait_s=5)  # it returns before the others act: nothing is failed
    assert b.fail_orphans("server-a", "gone") == []
    assert back.unfinished()[0].state == RUNNING
    back.close()
    failed_ids: list[str] = []
    assert eventually(
        lambda: bool(failed_ids.extend(b.fail_orphans("server-a", "its server is gone")) or failed_ids)
    )
    assert failed_ids == ["j"]
    failed = b.get("j")
    assert failed is not None and (failed.state, failed.reason) == (FAILED, "its server is gone")
    assert failed.finished_at is not None
    assert b.get("done") == finished  # an ended job is left as it was
    b.close()
