"""Index jobs with several servers over one PostgreSQL store (server/jobs/job_store_pg.py): a job runs on the
server that started it, and the others answer for it. Two `sieve serve` processes, no Redis (each embeds its
own jobs in-process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from sieve.v1 import collections_pb2, documents_pb2, jobs_pb2, jobs_pb2_grpc

from tests.system.test_durability import COLLECTION, NO_AUTO_SNAPSHOT, Client, kill_9, running_server
from tests.system.test_pg_servers import create, search, servers  # noqa: F401 (a fixture)

J = jobs_pb2


def jobs_stub(client: Client) -> jobs_pb2_grpc.JobServiceStub:
    return jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(client.address))


def upload(stub: jobs_pb2_grpc.JobServiceStub, n: int, batch_size: int) -> jobs_pb2.Job:
    def requests() -> Iterator[jobs_pb2.UploadIndexJobRequest]:
        yield J.UploadIndexJobRequest(collection=COLLECTION, batch_size=batch_size)
        for start in range(0, n, 500):
            yield J.UploadIndexJobRequest(
                documents=[
                    documents_pb2.Document(id=f"j{i}", text=f"job line {i} about harbor item zq{i}")
                    for i in range(start, min(n, start + 500))
                ]
            )

    return stub.UploadIndexJob(requests(), timeout=60).job


def document_count(client: Client) -> int:
    info = client.collections.GetCollection(collections_pb2.GetCollectionRequest(name=COLLECTION), timeout=10)
    return info.collection.document_count


def test_a_job_started_on_one_server_is_seen_watched_and_resumed_through_the_other(
    pg_url: str, tmp_path: Path
) -> None:
    env = {"SIEVE_STORE_URL": pg_url, **NO_AUTO_SNAPSHOT}
    n = 1500
    with running_server(tmp_path / "b", tmp_path / "b.log", **env) as b:
        b_jobs = jobs_stub(b)
        with running_server(tmp_path / "a", tmp_path / "a.log", **env) as a:
            create(a, (b,))
            job = upload(jobs_stub(a), n, batch_size=10)
            # Through b: the job is there, as a's (b does not run it).
            seen = b_jobs.GetJob(J.GetJobRequest(id=job.id), timeout=10).job
            assert seen.id == job.id and seen.collection == COLLECTION and seen.total == n
            assert seen.state in (J.JOB_STATE_QUEUED, J.JOB_STATE_RUNNING), seen
            assert "on server" in seen.status, seen.status
            assert job.id in {j.id for j in b_jobs.ListJobs(J.ListJobsRequest(), timeout=10).jobs}
            watched = b_jobs.WatchJob(J.WatchJobRequest(id=job.id, min_interval_ms=50), timeout=120)
            for message in watched:
                if message.job.done >= 50:
                    break
            kill_9(a)
        assert message.job.done < n, "the job finished before the kill; make it longer"
        # a is gone: b still answers for the job from the database, as running on a.
        stranded = b_jobs.GetJob(J.GetJobRequest(id=job.id), timeout=10).job
        assert stranded.state == J.JOB_STATE_RUNNING and stranded.done >= 50

        # Watched through b while a restarts on its data directory and resumes its job.
        final: list[jobs_pb2.Job] = []
        watcher = threading.Thread(
            target=lambda: final.extend(
                m.job for m in b_jobs.WatchJob(J.WatchJobRequest(id=job.id), timeout=180)
            )
        )
        watcher.start()
        with running_server(tmp_path / "a", tmp_path / "a.log", **env) as a:
            watcher.join(timeout=180)
            assert not watcher.is_alive()
            last = final[-1]
            assert (last.state, last.done, last.failed, last.resumes) == (J.JOB_STATE_SUCCEEDED, n, 0, 1), (
                last
            )
            # Every line is searchable through b at the job's generation, and counted through a.
            hits = search(b, f"zq{n - 1}", last.generation, lexical=True)
            assert [h.id for h in hits.hits] == [f"j{n - 1}"]
            assert document_count(a) == n
        assert f"job {job.id}: resuming at line" in (tmp_path / "a.log").read_text()


def test_a_job_is_cancelled_through_another_server(servers: tuple[Client, Client]) -> None:  # noqa: F811
    a, b = servers
    create(a, (b,))
    n = 20_000
    job = upload(jobs_stub(a), n, batch_size=20)
    a_jobs, b_jobs = jobs_stub(a), jobs_stub(b)
    for message in a_jobs.WatchJob(J.WatchJobRequest(id=job.id, min_interval_ms=50), timeout=120):
        if message.job.done >= 100:
            break
    asked = time.monotonic()
    cancelled = b_jobs.CancelJob(J.CancelJobRequest(id=job.id), timeout=30).job
    took = time.monotonic() - asked
    assert cancelled.state == J.JOB_STATE_CANCELLED, cancelled
    assert cancelled.cancel_requested and cancelled.done < n
    assert took < 10, f"the cancel took {took:.1f} s to reach the server running the job"
    # The server running it says so too, and kept exactly the committed prefix.
    on_a = a_jobs.GetJob(J.GetJobRequest(id=job.id), timeout=10).job
    assert on_a.state == J.JOB_STATE_CANCELLED and "committed through line" in on_a.reason, on_a
    assert document_count(a) == on_a.committed_through_line == on_a.done
    assert "cancel requested through another server" in a.log.read_text()
    # Cancelling again, through either, answers with how it ended.
    assert b_jobs.CancelJob(J.CancelJobRequest(id=job.id), timeout=30).job.state == J.JOB_STATE_CANCELLED
    # A job that has ended cannot be cancelled through another server either.
    done = upload(a_jobs, 5, batch_size=5)
    for _ in a_jobs.WatchJob(J.WatchJobRequest(id=done.id), timeout=60):
        pass
    try:
        b_jobs.CancelJob(J.CancelJobRequest(id=done.id), timeout=30)
        raise AssertionError("cancelling a finished job through another server succeeded")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "succeeded" in (exc.details() or "")


def test_a_gone_servers_job_is_failed_by_another_and_not_resumed_when_it_returns(
    pg_url: str, tmp_path: Path
) -> None:
    env = {"SIEVE_STORE_URL": pg_url, "SIEVE_JOB_ORPHAN_AFTER_S": "2", **NO_AUTO_SNAPSHOT}
    with running_server(tmp_path / "b", tmp_path / "b.log", **env) as b:
        b_jobs = jobs_stub(b)
        with running_server(tmp_path / "a", tmp_path / "a.log", **env) as a:
            create(a, (b,))
            job = upload(jobs_stub(a), 20_000, batch_size=20)
            for message in b_jobs.WatchJob(J.WatchJobRequest(id=job.id, min_interval_ms=50), timeout=120):
                if message.job.done >= 40:
                    break
            time.sleep(3)  # longer than SIEVE_JOB_ORPHAN_AFTER_S: a running server's jobs are left alone
            assert b_jobs.GetJob(J.GetJobRequest(id=job.id), timeout=10).job.state == J.JOB_STATE_RUNNING
            kill_9(a)
        final = list(b_jobs.WatchJob(J.WatchJobRequest(id=job.id), timeout=60))[-1].job
        assert final.state == J.JOB_STATE_FAILED and "has been gone" in final.reason, final
        assert f"job {job.id}: failed: its server" in (tmp_path / "b.log").read_text()
        with running_server(tmp_path / "a", tmp_path / "a.log", **env) as a:
            again = jobs_stub(a).GetJob(J.GetJobRequest(id=job.id), timeout=10).job
            assert again.state == J.JOB_STATE_FAILED and again.done == final.done
        assert not list((tmp_path / "a" / "jobs" / "uploads").glob("*.jsonl")), (
            "the failed job's spool was kept"
        )
        assert f"job {job.id}: resuming" not in (tmp_path / "a.log").read_text()
