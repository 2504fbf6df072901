"""A request id follows a call from the gRPC server into the Celery worker's log, end to end.

Real redis-server, a real Celery worker process (text, then JSON log format) and an in-process server
whose collection stores the token vectors of a ColBERT bundle (the seeded checkpoint, exported here), so
that both a search and the writes have work for a worker:
- Search with late interaction and `x-request-id`: the id comes back as trailing metadata, and the
  worker's log lines about the `sieve.query_tokens` task (ours and Celery's own) carry it;
- UpsertDocuments with `x-request-id`: the id comes back; the documents' ColBERT token vectors are then
  computed outside any call, by the server's backfill, whose `sieve.document_tokens` tasks carry
  `tokens-<collection>`;
- an index job (outside any call): its batches carry `job-<job id>`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, jobs_pb2, jobs_pb2_grpc, search_pb2

from sieve_core.logs import REQUEST_ID_METADATA
from sieve_core.tasking import SieveCelery
from tests.conftest import MODEL, MODELS_DIR, Worker, make_settings, start_api, start_worker, stop_api
from tests.corpus import DOCS
from tests.integration.test_full_cascade import COLBERT, _export, _wait_until_stored

pytestmark = pytest.mark.asyncio(loop_scope="session")

LATE = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, retrieve_candidates=6, late_interaction_keep=3
)
# How long the worker may take to write a task's log lines after its result arrived (the end-of-task line
# follows the stored result). Seconds in practice; generous for a loaded 2-core machine.
LOG_WAIT_S = 30.0


@pytest.fixture(params=["text", "json"])
def log_format(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("rid-models")
    (work / "models").mkdir()
    (work / "models" / MODEL).symlink_to(MODELS_DIR / MODEL)
    proc = _export("colbert", "sieve_core.models.export_colbert", work, COLBERT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return work / "models"


@pytest.fixture
def fmt_worker(
    log_format: str, models_dir: Path, redis_url: str, client_app: SieveCelery, tmp_path: Path
) -> Iterator[Worker]:
    """A worker on embed + colbert that logs in `log_format`."""
    running = start_worker(
        redis_url,
        client_app,
        tmp_path / f"worker-{log_format}.log",
        models_dir=models_dir,
        extra_env={"SIEVE_LOG_FORMAT": log_format, "SIEVE_LATE_INTERACTION_MODEL": COLBERT},
        name=f"rid-{log_format}",
    )
    try:
        yield running
    finally:
        running.kill()


def _wait_for_lines(worker: Worker, found: Callable[[list[str]], bool]) -> list[str]:
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        lines = worker.log.read_text(errors="replace").splitlines()
        if found(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def _task_line(lines: list[str], rid: str, task: str, log_format: str) -> str | None:
    """The worker's end-of-task line for `task` under request id `rid`."""
    for line in lines:
        if rid not in line:
            continue
        if log_format == "json":
            record = json.loads(line)
            if record.get("task") == task and record["request_id"] == rid:
                return line
        elif f"[{rid}]: task {task} " in line:
            return line
    return None


async def test_the_request_id_reaches_the_worker_log(
    log_format: str, fmt_worker: Worker, models_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path / "data", redis_url=redis_url, models_dir=models_dir, late_interaction_model=COLBERT
    )
    api = await start_api(settings)
    try:
        name = f"rid-{uuid.uuid4().hex[:8]}"
        await api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(
                    name=name,
                    defaults=common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT),
                )
            )
        )
        tag = uuid.uuid4().hex[:8]  # fresh texts: the write must send token vectors to compute
        upsert_id = f"upsert-{log_format}-{uuid.uuid4().hex}"
        upsert = api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name,
                documents=[documents_pb2.Document(id=i, text=f"{t} ({tag})") for i, t in DOCS.items()],
            ),
            metadata=((REQUEST_ID_METADATA, upsert_id),),
            timeout=60,
        )
        await upsert
        assert dict(await upsert.trailing_metadata())[REQUEST_ID_METADATA] == upsert_id
        await _wait_until_stored(api, name)  # the backfill had the workers compute them

        search_id = f"search-{log_format}-{uuid.uuid4().hex}"
        call = api.search.Search(
            search_pb2.SearchRequest(
                collection=name, query=f"does aspirin prevent heart attacks {tag}", top_k=3, settings=LATE
            ),
            metadata=((REQUEST_ID_METADATA, search_id),),
            timeout=60,
        )
        response = await call
        late = response.stages[1]
        assert late.status == search_pb2.STAGE_STATUS_COMPLETED, late.reason
        assert late.query_token_source == "worker", late.method  # not answered from a cache
        assert dict(await call.trailing_metadata())[REQUEST_ID_METADATA] == search_id

        # An index job: no call around its batches, so they carry the job's id.
        path = tmp_path / "docs.jsonl"
        path.write_text(
            "".join(json.dumps({"id": f"j{i}", "text": f"job text {i} {tag}"}) + "\n" for i in range(8))
        )
        jobs = jobs_pb2_grpc.JobServiceStub(api.channel)
        job = (
            await jobs.StartIndexJob(
                jobs_pb2.StartIndexJobRequest(collection=name, path=str(path), batch_size=4), timeout=30
            )
        ).job
        final = [m.job async for m in jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=120)][-1]
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.reason
        job_rid = f"job-{job.id}"
    finally:
        await stop_api(api)

    expected = {
        (search_id, "sieve.query_tokens"): 1,  # the query
        (f"tokens-{name}", "sieve.document_tokens"): len(DOCS),
        (job_rid, "sieve.embed"): 4,  # each of the two batches (vectors and ColBERT token vectors)
    }
    lines = _wait_for_lines(
        fmt_worker, lambda ls: all(_task_line(ls, rid, task, log_format) for rid, task in expected)
    )
    log_text = "\n".join(lines)
    for (rid, task), items in expected.items():
        line = _task_line(lines, rid, task, log_format)
        assert line is not None, f"no end-of-task line for {task} with {rid}:\n{log_text[-3000:]}"
        if log_format == "json":
            record = json.loads(line)
            assert (record["level"], record["state"], record["items"]) == ("INFO", "SUCCESS", items), record
            assert record["ms"] > 0 and record["task_id"]
        else:
            assert f"task {task} SUCCESS: {items} items in " in line and " INFO " in line, line
    # Celery's own line about the task (logged while it ran) carries the id too, not only ours.
    assert any(rid_line for rid_line in lines if search_id in rid_line and "succeeded in" in rid_line), (
        log_text[-3000:]
    )
    # Both of the job's batches, under the job's id.
    assert sum(1 for line in lines if job_rid in line and "sieve.embed" in line and "SUCCESS" in line) >= 2

    if log_format == "json":
        records = [json.loads(line) for line in lines if line.startswith("{")]
        # Every log record is a JSON object with a request id ("-" outside any task): nothing in
        # Celery's or the text format slipped through (the start-up banner is printed, not logged).
        assert len(records) >= 10 and all("request_id" in r and "message" in r for r in records)
        assert not [line for line in lines if re.match(r"^\[?\d{4}-\d\d-\d\d", line)], log_text[-3000:]
        outside = [r for r in records if "warm in" in r["message"]]
        assert outside and all(r["request_id"] == "-" for r in outside)
    else:
        # Celery's default format ("[2026-... INFO/MainProcess] ...") was replaced by ours.
        assert not [line for line in lines if re.match(r"^\[\d{4}-\d\d-\d\d", line)], log_text[-3000:]
