"""Index jobs end to end: real servers, a real redis-server and real Celery worker processes.

In-process server without Redis (jobs embed in-process): bad lines, duplicate ids, uploads, read-your-
writes, the CLI. With Redis and workers: a full job (progress stream, token vectors stored), cancel mid-
job, two workers sharing a job, no worker at all, and `kill -9` of a `sieve serve` process mid-job.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    search_pb2,
)

from sieve_cli import stack
from tests.conftest import MODEL, MODELS_DIR, ROOT, Api, Worker, make_settings, start_api, stop_api

aio = pytest.mark.asyncio(loop_scope="session")
Code = grpc.StatusCode
J = jobs_pb2
WORDS = "amber basil cedar delta ember fjord gravel harbor iris juniper kelp lotus maple nectar onyx pine"


def _text(i: int, tag: str = "") -> str:
    """Short, distinct texts (fast to embed)."""
    vocab = WORDS.split()
    words = " ".join(vocab[(i * k + k) % len(vocab)] for k in (1, 3, 5, 7))
    return f"{words} item {i}{tag}"


def _write(path: Path, lines: list[object]) -> Path:
    """Each entry a dict or list (a JSON line), str (written as is) or bytes (raw)."""
    with path.open("wb") as fh:
        for line in lines:
            if isinstance(line, dict | list):
                fh.write(json.dumps(line).encode())
            elif isinstance(line, str):
                fh.write(line.encode())
            else:
                fh.write(line)  # type: ignore[arg-type]
            fh.write(b"\n")
    return path


def _jobs(api: Api) -> jobs_pb2_grpc.JobServiceStub:
    return jobs_pb2_grpc.JobServiceStub(api.channel)


async def _collection(api: Api, late_interaction: bool = False) -> str:
    name = f"job-{uuid.uuid4().hex[:8]}"
    defaults = common_pb2.SearchSettings(
        late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT if late_interaction else common_pb2.STAGE_MODE_OFF
    )
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(name=name, defaults=defaults)
        )
    )
    return name


async def _watch(api: Api, job_id: str) -> list[jobs_pb2.Job]:
    stream = _jobs(api).WatchJob(J.WatchJobRequest(id=job_id, min_interval_ms=50), timeout=90)
    return [message.job async for message in stream]


async def _info(api: Api, name: str) -> collections_pb2.Collection:
    return (await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))).collection


async def _all_errors(api: Api, job_id: str, page: int) -> list[jobs_pb2.JobError]:
    errors: list[jobs_pb2.JobError] = []
    after = 0
    while True:
        response = await _jobs(api).GetJob(
            J.GetJobRequest(id=job_id, max_errors=page, errors_after_line=after)
        )
        errors += response.errors
        if not response.next_errors_after_line:
            return errors
        after = response.next_errors_after_line


async def _expect(call, code: grpc.StatusCode, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details(), err.value.details()


# -- without Redis: the job embeds in-process --------------------------------------------------------
@pytest.fixture(params=["in-process", "workers"])
def either(request):  # type: ignore[no-untyped-def]
    """The session server (no Redis: jobs embed in-process), or the one with Redis and a worker."""
    return request.getfixturevalue("api" if request.param == "in-process" else "wapi")


@aio
async def test_bad_lines_are_dead_lettered_and_the_last_line_with_an_id_wins(either, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api = either
    name = await _collection(api)
    lines: list[object] = []
    expected_errors: list[tuple[int, str]] = []

    def good(doc_id: str, text: str, **extra: object) -> None:
        lines.append({"id": doc_id, "text": text, **extra})

    def bad(line: object, fragment: str) -> None:
        lines.append(line)
        expected_errors.append((len(lines), fragment))

    good("a", "first version of a")  # 1
    good("dup-in-batch", "replaced within its batch")  # 2
    bad("{broken json", "invalid JSON")  # 3
    good("dup-in-batch", "the text that stays")  # 4 (same batch of 4 lines as line 2)
    lines.append("")  # 5: blank, skipped, not counted
    bad({"text": "no id"}, 'missing id ("id")')  # 6
    bad({"id": "empty", "text": "  "}, "has empty text")  # 7
    bad({"id": "huge", "text": "x" * 65_537}, "text has 65537 characters; the limit is 65536")  # 8
    bad([1, 2], "not a JSON object")  # 9
    bad(
        {"id": "meta", "text": "t", "metadata": {"k": 1}}, '"metadata" must be an object with string values'
    )  # 10
    bad({"id": ["x"], "text": "t"}, "must be a string or an integer")  # 11
    bad(b"\xff\xfe not utf-8", "not valid UTF-8")  # 12
    bad({"id": "nul", "text": "a\x00b"}, "NUL")  # 13
    lines.append({"_id": "beir-1", "title": "A BEIR title.", "text": "And its abstract."})  # 14
    lines.append({"id": 42, "text": "an integer id"})  # 15
    for i in range(16, 40):
        good(f"doc-{i}", _text(i), metadata={"n": str(i)})
    good("a", "last version of a")  # 40: several batches after line 1
    path = _write(tmp_path / "docs.jsonl", lines)

    job = (
        await _jobs(api).StartIndexJob(J.StartIndexJobRequest(collection=name, path=str(path), batch_size=4))
    ).job
    assert job.state in (J.JOB_STATE_QUEUED, J.JOB_STATE_RUNNING) and job.batch_size == 4
    final = (await _watch(api, job.id))[-1]
    n_valid = 40 - 1 - len(expected_errors)  # minus the blank line and the bad ones
    assert final.state == J.JOB_STATE_SUCCEEDED, final
    assert (final.total, final.done, final.failed) == (39, n_valid, len(expected_errors))
    assert final.committed_through_line == 40 and not final.reason
    assert final.embedder == ("in-process" if api.server.settings.redis_url is None else "workers")

    errors = await _all_errors(api, job.id, page=3)  # paged, three at a time
    assert [e.line for e in errors] == [line for line, _ in expected_errors]
    for err, (line, fragment) in zip(errors, expected_errors, strict=True):
        assert fragment in err.reason, (line, err.reason)
    assert {e.line: e.document_id for e in errors}[7] == "empty"

    got = await api.documents.GetDocuments(
        documents_pb2.GetDocumentsRequest(
            collection=name, ids=["a", "dup-in-batch", "beir-1", "42", "doc-20"]
        )
    )
    texts = {d.id: d.text for d in got.documents}
    assert texts["a"] == "last version of a" and texts["dup-in-batch"] == "the text that stays"
    assert texts["beir-1"] == "A BEIR title. And its abstract." and texts["42"] == "an integer id"
    assert {d.id: dict(d.metadata) for d in got.documents}["doc-20"] == {"n": "20"}
    info = await _info(api, name)
    assert info.document_count == 4 + 24 and info.generation == final.generation

    # Read your writes: the job's generation is searchable at once; a later one is refused after a short wait.
    hit = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query=_text(20), top_k=1, min_generation=final.generation)
    )
    assert hit.hits[0].id == "doc-20" and hit.generation >= final.generation
    started = time.monotonic()
    await _expect(
        api.search.Search(
            search_pb2.SearchRequest(collection=name, query="x", min_generation=final.generation + 1),
            timeout=0.6,
        ),
        Code.FAILED_PRECONDITION,
        f"below the requested min_generation {final.generation + 1}",
    )
    assert time.monotonic() - started < 0.6
    await _expect(
        api.search.Search(search_pb2.SearchRequest(collection=name, query="x", min_generation=-1)),
        Code.INVALID_ARGUMENT,
        "min_generation must be 0 or more",
    )


@aio
async def test_upload_is_spooled_and_indexed(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)

    async def documents() -> AsyncIterator[jobs_pb2.UploadIndexJobRequest]:
        yield J.UploadIndexJobRequest(collection=name, batch_size=8)
        for b in range(3):
            docs = [documents_pb2.Document(id=f"u{b}-{i}", text=_text(10 * b + i)) for i in range(10)]
            if b == 1:
                docs[4] = documents_pb2.Document(id="blank", text="")  # position 15 of the upload
            yield J.UploadIndexJobRequest(documents=docs)

    job = (await _jobs(api).UploadIndexJob(documents())).job
    assert (job.source, job.total) == ("upload", 30)
    final = (await _watch(api, job.id))[-1]
    assert (final.state, final.done, final.failed) == (J.JOB_STATE_SUCCEEDED, 29, 1)
    errors = (await _jobs(api).GetJob(J.GetJobRequest(id=job.id))).errors
    assert [(e.line, e.document_id) for e in errors] == [(15, "blank")]
    assert (await _info(api, name)).document_count == 29
    spool = api.server.settings.data_dir / "jobs" / "uploads"
    assert not list(spool.glob(f"{job.id}*")), "the spool of a finished upload was not removed"

    # Raw JSONL cut anywhere: the server reads the lines as it reads a file's.
    raw = (
        b"".join(json.dumps({"id": f"r{i}", "text": _text(i)}).encode() + b"\n" for i in range(12)) + b"{oops"
    )

    async def chunks() -> AsyncIterator[jobs_pb2.UploadIndexJobRequest]:
        yield J.UploadIndexJobRequest(collection=name)
        for start in range(0, len(raw), 37):
            yield J.UploadIndexJobRequest(jsonl=raw[start : start + 37])

    job = (await _jobs(api).UploadIndexJob(chunks())).job
    final = (await _watch(api, job.id))[-1]
    assert (final.total, final.done, final.failed) == (13, 12, 1)
    assert [e.line for e in (await _jobs(api).GetJob(J.GetJobRequest(id=job.id))).errors] == [13]


@aio
async def test_a_graceful_stop_pauses_a_job_and_the_next_start_resumes_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path / "data")  # no Redis: the job embeds in-process
    n = 1500
    path = _write(tmp_path / "pause.jsonl", [{"id": f"p{i}", "text": _text(i, " p")} for i in range(n)])
    api = await start_api(settings)
    try:
        name = await _collection(api)
        job = (
            await _jobs(api).StartIndexJob(
                J.StartIndexJobRequest(collection=name, path=str(path), batch_size=8)
            )
        ).job
        async for message in _jobs(api).WatchJob(J.WatchJobRequest(id=job.id, min_interval_ms=50)):
            if message.job.done >= 16:
                break
        assert message.job.done < n
    finally:
        started = time.monotonic()
        await stop_api(api)
    assert time.monotonic() - started < 10, "stopping waited for the whole job"
    api = await start_api(settings)
    try:
        final = (await _watch(api, job.id))[-1]
        assert (final.state, final.done, final.resumes) == (J.JOB_STATE_SUCCEEDED, n, 1), final
        assert (await _info(api, name)).document_count == n
    finally:
        await stop_api(api)


@aio
async def test_bad_requests(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    jobs = _jobs(api)
    path = _write(tmp_path / "one.jsonl", [{"id": "1", "text": "one"}])
    await _expect(
        jobs.StartIndexJob(J.StartIndexJobRequest(collection=name, path="docs.jsonl")),
        Code.INVALID_ARGUMENT,
        "is not absolute",
    )
    await _expect(
        jobs.StartIndexJob(J.StartIndexJobRequest(collection=name, path=str(tmp_path / "missing.jsonl"))),
        Code.INVALID_ARGUMENT,
        "is not a file on the server",
    )
    await _expect(
        jobs.StartIndexJob(J.StartIndexJobRequest(collection="no-such", path=str(path))),
        Code.NOT_FOUND,
        "no-such",
    )
    await _expect(
        jobs.StartIndexJob(J.StartIndexJobRequest(collection=name, path=str(path), batch_size=501)),
        Code.INVALID_ARGUMENT,
        "batch_size must be between 1 and 500",
    )
    await _expect(jobs.GetJob(J.GetJobRequest(id="0123456789abcdef")), Code.NOT_FOUND, "does not exist")
    await _expect(jobs.WatchJob(J.WatchJobRequest(id="nope")).read(), Code.INVALID_ARGUMENT, "invalid job id")

    async def nameless() -> AsyncIterator[jobs_pb2.UploadIndexJobRequest]:
        yield J.UploadIndexJobRequest(documents=[documents_pb2.Document(id="1", text="x")])

    await _expect(jobs.UploadIndexJob(nameless()), Code.INVALID_ARGUMENT, "must name the collection")

    done = (await jobs.StartIndexJob(J.StartIndexJobRequest(collection=name, path=str(path)))).job
    await _watch(api, done.id)
    await _expect(
        jobs.CancelJob(J.CancelJobRequest(id=done.id)), Code.FAILED_PRECONDITION, "already succeeded"
    )
    listed = (await jobs.ListJobs(J.ListJobsRequest(collection=name))).jobs
    assert [j.id for j in listed] == [done.id]


@aio
async def test_cli_index_and_jobs(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = f"cli-{uuid.uuid4().hex[:8]}"
    path = _write(tmp_path / "cli.jsonl", [*({"id": f"c{i}", "text": _text(i)} for i in range(20)), "{bad"])

    async def sieve(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv" / "bin" / "sieve"),
            *args,
            "--address",
            api.address,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await sieve("index", str(path), "--collection", name, "--create", "--upload", "--json")
    assert code == 3, err  # succeeded, with a bad line
    job = json.loads(out)
    assert (job["state"], job["done"], job["failed"]) == ("JOB_STATE_SUCCEEDED", "20", "1")
    code, out, err = await sieve("index", str(path), "--collection", name)
    assert code == 3, err
    assert "SUCCEEDED: 20 documents committed, 1 bad lines" in out and "line 21: invalid JSON" in out
    assert "search with min_generation=" in out
    code, out, _ = await sieve("jobs", "list", "--collection", name, "--json")
    assert code == 0 and len(json.loads(out)) == 2
    code, out, _ = await sieve("jobs", "show", job["id"], "--json")
    assert code == 0 and json.loads(out)["errors"][0]["line"] == "21"
    code, _, err = await sieve("jobs", "cancel", job["id"])
    assert code == 1 and "FAILED_PRECONDITION" in err


# -- with Redis and real Celery workers -------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def wapi(
    redis_url: str, worker: Worker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    running = await start_api(make_settings(tmp_path_factory.mktemp("jobs-workers"), redis_url=redis_url))
    yield running
    await stop_api(running)


@aio
async def test_a_job_on_workers_streams_progress_and_stores_token_vectors(wapi, redis_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(wapi, late_interaction=True)
    tag = f" ({uuid.uuid4().hex[:6]})"
    rows = [{"id": f"w{i}", "text": _text(i, tag)} for i in range(300)]
    path = _write(tmp_path / "w.jsonl", rows)
    job = (
        await _jobs(wapi).StartIndexJob(
            J.StartIndexJobRequest(collection=name, path=str(path), batch_size=20)
        )
    ).job
    updates = await _watch(wapi, job.id)
    final = updates[-1]
    assert (final.state, final.total, final.done, final.failed) == (J.JOB_STATE_SUCCEEDED, 300, 300, 0), final
    assert final.embedder == "workers" and final.batch_retries == 0
    progress = [u.done for u in updates]
    assert progress == sorted(progress) and len(set(progress)) >= 3, progress  # a stream, not one answer
    assert any(u.state == J.JOB_STATE_RUNNING and u.docs_per_second > 0 for u in updates)
    assert any(u.HasField("eta_seconds") for u in updates)
    info = await _info(wapi, name)
    assert (info.document_count, info.generation) == (300, final.generation)

    # The workers returned the token vectors of the same pass (the collection re-ranks by late
    # interaction), and the server stored them with the documents: none pending.
    assert info.token_storage.pending == 0 and info.token_storage.description == "int4, pool 2"
    store = wapi.server.engine.store
    row = store.get_collection(name)
    assert row.token_count == 300
    hit = await wapi.search.Search(
        search_pb2.SearchRequest(
            collection=name, query=rows[150]["text"], top_k=1, min_generation=final.generation
        )
    )
    assert hit.hits[0].id == "w150"


@aio
async def test_cancel_mid_job_keeps_a_consistent_prefix(wapi, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(wapi)
    n = 3000
    path = _write(tmp_path / "big.jsonl", [{"id": f"c{i + 1}", "text": _text(i)} for i in range(n)])
    jobs = _jobs(wapi)
    job = (
        await jobs.StartIndexJob(J.StartIndexJobRequest(collection=name, path=str(path), batch_size=10))
    ).job
    async for message in jobs.WatchJob(J.WatchJobRequest(id=job.id, min_interval_ms=50)):
        if message.job.done >= 20:
            break
    cancelled = (await jobs.CancelJob(J.CancelJobRequest(id=job.id), timeout=30)).job
    assert cancelled.state == J.JOB_STATE_CANCELLED, cancelled
    assert 20 <= cancelled.done < n and cancelled.cancel_requested and "cancelled" in cancelled.reason
    assert cancelled.committed_through_line == cancelled.done  # one document a line, no bad lines
    await asyncio.sleep(1.0)  # nothing lands after the cancel
    info = await _info(wapi, name)
    assert (info.document_count, info.generation) == (cancelled.done, cancelled.generation)
    k = cancelled.done
    ids = [f"c{i}" for i in range(max(1, k - 400), min(n, k + 400) + 1)]
    got = await wapi.documents.GetDocuments(documents_pb2.GetDocumentsRequest(collection=name, ids=ids))
    assert {d.id for d in got.documents} == {f"c{i}" for i in range(max(1, k - 400), k + 1)}
    assert [m.job.state async for m in jobs.WatchJob(J.WatchJobRequest(id=job.id))] == [J.JOB_STATE_CANCELLED]
    again = (await jobs.CancelJob(J.CancelJobRequest(id=job.id))).job
    assert again.state == J.JOB_STATE_CANCELLED and again.done == cancelled.done


@contextmanager
def _second_worker(redis_url: str, log: Path) -> Iterator[stack.WorkerProcess]:
    """A second `embed` worker (sieve_cli.stack), killed with its pool on the way out."""
    settings = {"SIEVE_DEFAULT_EMBEDDING_MODEL": MODEL}
    with stack.start_worker(
        redis_url, log, queues="embed", models_dir=MODELS_DIR, settings=settings, name="second", timeout_s=60
    ) as worker:
        yield worker


def _embed_tasks_done(log: Path) -> int:
    return sum(
        1
        for line in log.read_text(errors="replace").splitlines()
        if "sieve.embed[" in line and "succeeded" in line
    )


@aio
async def test_two_workers_share_a_job_and_commits_keep_source_order(
    wapi, worker: Worker, redis_url, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(wapi)
    # Batches of 10 lines alternate long and short texts, so that with two workers a later batch often
    # comes back before an earlier one. The first line of every batch rewrites a "hot" id shared by four
    # consecutive batches (all in flight together): commits in source order leave the last version.
    lines: list[object] = []
    for k in range(60):
        filler = " ".join([_text(k)] * (24 if k % 2 == 0 else 1))
        lines.append({"id": f"hot{k // 4}", "text": f"hot version {k}: {filler}"})
        lines += [{"id": f"t{k}-{j}", "text": f"{_text(10 * k + j)} {filler}"} for j in range(1, 10)]
    path = _write(tmp_path / "two.jsonl", lines)
    with _second_worker(redis_url, tmp_path / "second.log") as _:
        before = _embed_tasks_done(worker.log)
        job = (
            await _jobs(wapi).StartIndexJob(
                J.StartIndexJobRequest(collection=name, path=str(path), batch_size=10)
            )
        ).job
        final = (await _watch(wapi, job.id))[-1]
        assert (final.state, final.done) == (J.JOB_STATE_SUCCEEDED, 600), final
        first, second = _embed_tasks_done(worker.log) - before, _embed_tasks_done(tmp_path / "second.log")
    assert first > 0 and second > 0 and first + second >= 60, (first, second)
    assert (await _info(wapi, name)).document_count == 15 + 60 * 9
    hot = [f"hot{m}" for m in range(15)]
    got = await wapi.documents.GetDocuments(documents_pb2.GetDocumentsRequest(collection=name, ids=hot))
    assert [d.text.split(":")[0] for d in got.documents] == [f"hot version {4 * m + 3}" for m in range(15)]


@aio
async def test_no_worker_is_reported_then_fails_the_job(redis_url, worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Database 1 of the same Redis: a broker no worker listens on.
    settings = make_settings(
        tmp_path,
        redis_url=redis_url.rsplit("/", 1)[0] + "/1",
        job_worker_wait_s=0.3,
        job_worker_timeout_s=2.0,
    )
    api = await start_api(settings)
    try:
        name = await _collection(api)
        path = _write(tmp_path / "few.jsonl", [{"id": f"n{i}", "text": _text(i)} for i in range(10)])
        job = (await _jobs(api).StartIndexJob(J.StartIndexJobRequest(collection=name, path=str(path)))).job
        updates = await _watch(api, job.id)
        waiting = [u for u in updates if u.waiting_for_workers]
        assert waiting and "no worker consumes the embed queue" in waiting[0].status
        final = updates[-1]
        assert final.state == J.JOB_STATE_FAILED and final.done == 0
        assert (
            "no worker consumed the embed queue for 2 s" in final.reason
            and "committed through line 0" in final.reason
        )
        assert not final.waiting_for_workers
    finally:
        await stop_api(api)


@aio
async def test_documents_a_worker_task_cannot_take_are_isolated_as_bad_lines(
    redis_url, worker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # The server accepts texts up to 100,000 characters, the embed task contract only 65,536: the job
    # bisects the failing batches down to those documents and records them; the rest is committed.
    api = await start_api(make_settings(tmp_path, redis_url=redis_url, max_text_chars=100_000))
    try:
        name = await _collection(api)
        rows = [{"id": f"i{i}", "text": _text(i, " iso")} for i in range(30)]
        for i in (3, 7, 22):  # two in the first batch of 10, one in the third
            rows[i]["text"] = "long " * 14_000
        path = _write(tmp_path / "iso.jsonl", rows)
        job = (
            await _jobs(api).StartIndexJob(
                J.StartIndexJobRequest(collection=name, path=str(path), batch_size=10)
            )
        ).job
        final = (await _watch(api, job.id))[-1]
        assert (final.state, final.done, final.failed) == (J.JOB_STATE_SUCCEEDED, 27, 3), final
        errors = (await _jobs(api).GetJob(J.GetJobRequest(id=job.id))).errors
        assert [(e.line, e.document_id) for e in errors] == [(4, "i3"), (8, "i7"), (23, "i22")]
        assert all("embedding failed: the embed task refuses it" in e.reason for e in errors), errors
        assert (await _info(api, name)).document_count == 27
    finally:
        await stop_api(api)


# -- kill -9 of a real `sieve serve` process mid-job -------------------------------------------------
@contextmanager
def _serve(
    data_dir: Path, log: Path, redis_url: str
) -> Iterator[tuple[subprocess.Popen[bytes], grpc.Channel]]:
    """A `sieve serve` child (sieve_cli.stack) on this Redis, SIGKILLed if still alive on the way out."""
    with (
        stack.sieve_process(
            "serve",
            data_dir=data_dir,
            settings={"SIEVE_REDIS_URL": redis_url},
            log=log,
            models_dir=MODELS_DIR,
            timeout_s=60,
            stop="kill",
        ) as served,
        grpc.insecure_channel(served.address) as channel,
    ):
        yield served.proc, channel


def _sync_watch(stub: jobs_pb2_grpc.JobServiceStub, job_id: str) -> jobs_pb2.Job:
    job = None
    for message in stub.WatchJob(J.WatchJobRequest(id=job_id), timeout=90):
        job = message.job
    assert job is not None
    return job


def test_kill_9_mid_job_resumes_after_restart(worker: Worker, redis_url: str, tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    n = 2000
    later = _write(tmp_path / "later.jsonl", [{"id": "x", "text": "never read"}])
    with _serve(data_dir, log, redis_url) as (proc, channel):
        collections = collections_pb2_grpc.CollectionServiceStub(channel)
        collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name="killed")),
            timeout=30,
        )
        jobs = jobs_pb2_grpc.JobServiceStub(channel)

        def upload() -> Iterator[jobs_pb2.UploadIndexJobRequest]:
            yield J.UploadIndexJobRequest(collection="killed", batch_size=10)
            for start in range(0, n, 500):
                yield J.UploadIndexJobRequest(
                    documents=[
                        documents_pb2.Document(id=f"k{i}", text=_text(i, " k"))
                        for i in range(start, start + 500)
                    ]
                )

        uploaded = jobs.UploadIndexJob(upload(), timeout=60).job
        # A second job on the same collection waits for the first (jobs on a collection run in order).
        queued = jobs.StartIndexJob(
            J.StartIndexJobRequest(collection="killed", path=str(later)), timeout=30
        ).job
        assert jobs.GetJob(J.GetJobRequest(id=queued.id), timeout=10).job.state == J.JOB_STATE_QUEUED
        for message in jobs.WatchJob(J.WatchJobRequest(id=uploaded.id, min_interval_ms=50), timeout=60):
            if message.job.done >= 50:
                break
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert message.job.done < n, "the job finished before the kill; make it longer"
    later.unlink()  # the queued job's source disappears while the server is down

    with _serve(data_dir, log, redis_url) as (proc, channel):
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        final = _sync_watch(jobs, uploaded.id)
        assert (final.state, final.total, final.done, final.failed) == (J.JOB_STATE_SUCCEEDED, n, n, 0), final
        assert final.resumes == 1 and final.committed_through_line == n
        failed = _sync_watch(jobs, queued.id)
        assert failed.state == J.JOB_STATE_FAILED and "no longer exists" in failed.reason, failed
        states = {j.state for j in jobs.ListJobs(J.ListJobsRequest(), timeout=10).jobs}
        assert states == {J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED}
        info = collections_pb2_grpc.CollectionServiceStub(channel).GetCollection(
            collections_pb2.GetCollectionRequest(name="killed"), timeout=10
        )
        assert info.collection.document_count == n
        docs = documents_pb2_grpc.DocumentServiceStub(channel)
        for start in range(0, n, 1000):
            ids = [f"k{i}" for i in range(start, start + 1000)]
            got = docs.GetDocuments(
                documents_pb2.GetDocumentsRequest(collection="killed", ids=ids), timeout=30
            )
            assert not got.missing_ids
            assert [d.text for d in got.documents] == [_text(i, " k") for i in range(start, start + 1000)]
        assert not list((data_dir / "jobs" / "uploads").iterdir()), "the finished upload's spool was kept"
    assert f"job {uploaded.id}: resuming at line" in log.read_text()
