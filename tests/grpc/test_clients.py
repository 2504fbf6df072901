"""The client facades: the Python `sieve` package against a real in-process server (every RPC, sync and
asyncio), deadlines, errors, retries (a late server, RetryInfo, what is never retried), TLS and the API
key against fake servers, the examples, the `sieve` client commands, and generated-code drift of both
clients (Python and TypeScript).

The sync client blocks its thread, and the in-process server runs on the test's event loop, so sync
calls go through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import sieve
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from sieve import AsyncSieveClient, RetryPolicy, SieveClient
from sieve.retry import is_retryable, next_wait
from sieve.v1 import collections_pb2, collections_pb2_grpc, search_pb2, search_pb2_grpc

from server.app import SieveServer
from sieve_cli.stack import free_port
from tests.conftest import ROOT, Api, make_settings

aio = pytest.mark.asyncio(loop_scope="session")
Code = grpc.StatusCode
NOTES = ROOT / "examples" / "data" / "notes.jsonl"
NODE_DIR = ROOT / "clients" / "node"
FAST_RETRY = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.3)
# For servers that start late: bounded by the call's deadline, not by attempts (a busy machine is slow).
PATIENT = RetryPolicy(max_attempts=10_000, initial_backoff=0.05, max_backoff=0.3)
QUICK_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]


def _name() -> str:
    return f"cl-{uuid.uuid4().hex[:10]}"


def _docs() -> list[dict[str, object]]:
    return [json.loads(line) for line in NOTES.read_text().splitlines()]


# -- every RPC through the sync client -------------------------------------------------------------
def _sync_walk(address: str, name: str, source: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    with SieveClient(address) as client:
        created = client.create_collection(name, metric="cosine", defaults={"retrieve_candidates": 40})
        assert created.name == name and created.dimensions == 384
        assert created.defaults.retrieve_candidates == 40
        assert client.get_collection(name).embedding_model_id == created.embedding_model_id
        assert name in [c.name for c in client.list_collections()]

        written = client.upsert_documents(name, _docs()[:12])
        assert (written.upserted, written.generation) == (12, 1)
        got = client.get_documents(name, ["cat", "nope"])
        assert [d.id for d in got.documents] == ["cat"] and list(got.missing_ids) == ["nope"]
        assert got.documents[0].metadata["topic"] == "animals"

        response = client.search(
            name,
            "subatomic particles",
            top_k=3,
            filter={"topic": "physics"},
            min_generation=written.generation,
        )
        assert response.hits[0].id == "quark" and {h.metadata["topic"] for h in response.hits} == {"physics"}
        assert response.stages[0].stage == sieve.Stage.STAGE_RETRIEVE
        assert response.hits[0].stage_scores[0].score == pytest.approx(response.hits[0].score)
        out["late"] = client.search(name, "a cat", late_interaction="best_effort", top_k=2)
        stream = list(client.search_stream(name, "a cat", top_k=2, tier="fast"))
        assert [m.final for m in stream] == [False] * (len(stream) - 1) + [True]
        assert stream[0].stage == sieve.Stage.STAGE_RETRIEVE and stream[-1].result.hits
        assert stream[0].result.stages[0].plan.startswith("budget 25 ms")  # the fast tier's budget

        deleted = client.delete_documents(name, ["cat", "nope"])
        assert (deleted.deleted, deleted.not_found) == (1, 1)

        # Jobs: a file the server reads, then an upload of documents, followed to the end.
        job = client.start_index_job(name, source.resolve(), format="sieve", batch_size=8)
        assert job.collection == name and job.state in (
            sieve.JobState.JOB_STATE_QUEUED,
            sieve.JobState.JOB_STATE_RUNNING,
        )
        seen = list(client.watch_job(job.id, min_interval_ms=50))
        assert seen[-1].state == sieve.JobState.JOB_STATE_SUCCEEDED and seen[-1].done == 20
        uploaded = client.upload_index_job(name, [{"id": "extra", "text": "An extra note about owls."}])
        final = list(client.watch_job(uploaded.id))[-1]
        assert final.state == sieve.JobState.JOB_STATE_SUCCEEDED and final.done == 1
        detail = client.get_job(job.id, max_errors=5)
        assert detail.job.id == job.id and not detail.errors
        assert {job.id, uploaded.id} <= {j.id for j in client.list_jobs(collection=name)}
        with pytest.raises(sieve.FailedPrecondition):  # a job that succeeded cannot be cancelled
            client.cancel_job(job.id)  # (the first job: the upload ran since, so it is no longer live)
        assert client.get_collection(name).document_count == 21

        client.delete_collection(name)
        with pytest.raises(sieve.NotFound) as err:
            client.get_collection(name)
        out["not_found"] = err.value
    return out


@aio
async def test_sync_client_every_rpc(api: Api, tmp_path: Path) -> None:
    source = tmp_path / "notes.jsonl"
    shutil.copy(NOTES, source)
    out = await asyncio.to_thread(_sync_walk, api.address, _name(), source)
    late = out["late"]
    assert isinstance(late, search_pb2.SearchResponse)
    stage = [s for s in late.stages if s.stage == sieve.Stage.STAGE_LATE_INTERACTION][0]
    # No Redis/worker behind the test server: the best-effort stage degrades with a reason.
    assert stage.status == sieve.StageStatus.STAGE_STATUS_DEGRADED and stage.reason
    err = out["not_found"]
    assert isinstance(err, sieve.NotFound) and isinstance(err, sieve.SieveError)
    assert err.code == Code.NOT_FOUND and "GetCollection" in str(err) and err.attempts == 1


@aio
async def test_async_client_every_rpc(api: Api) -> None:
    name = _name()
    async with AsyncSieveClient(api.address) as client:
        await client.create_collection(name, defaults={"late_interaction": "off"})
        assert (await client.get_collection(name)).name == name
        assert name in [c.name for c in await client.list_collections()]
        written = await client.upsert_documents(
            name, [sieve.Document(id="a", text="The owl hunts at night.")]
        )
        assert written.generation == 1
        assert [d.id for d in (await client.get_documents(name, ["a"])).documents] == ["a"]
        response = await client.search(name, "night bird", top_k=1, min_generation=1)
        assert response.hits[0].id == "a"
        raw = NOTES.read_bytes()
        job = await client.upload_index_job(name, (raw[i : i + 100] for i in range(0, len(raw), 100)))
        states = [j.state async for j in client.watch_job(job.id, min_interval_ms=50)]
        assert states[-1] == sieve.JobState.JOB_STATE_SUCCEEDED
        assert (await client.get_job(job.id)).job.done == 20
        assert job.id in [j.id for j in await client.list_jobs(collection=name, limit=5)]
        try:  # FAILED_PRECONDITION, or (when the job has only just ended) the finished job itself
            assert (await client.cancel_job(job.id)).state == sieve.JobState.JOB_STATE_SUCCEEDED
        except sieve.FailedPrecondition as exc:
            assert "nothing to cancel" in exc.message
        assert (await client.delete_documents(name, ["a"])).deleted == 1
        await client.delete_collection(name)
        with pytest.raises(sieve.NotFound):
            await client.delete_collection(name)


@aio
async def test_async_client_streams_a_search_with_evidence(api: Api) -> None:
    name = _name()
    async with AsyncSieveClient(api.address) as client:
        await client.create_collection(name, defaults={"late_interaction": "best_effort"})
        await client.upsert_documents(name, _docs())
        messages = [m async for m in client.search_stream(name, "subatomic particles", top_k=3)]
        assert [m.stage for m in messages] == [
            sieve.Stage.STAGE_RETRIEVE,
            sieve.Stage.STAGE_LATE_INTERACTION,
        ]
        final = messages[-1]
        assert final.final and not final.deadline_reached
        searched = await client.search(name, "subatomic particles", top_k=3)
        assert [(h.id, h.score, list(h.evidence)) for h in final.result.hits] == [
            (h.id, h.score, list(h.evidence)) for h in searched.hits
        ]
        for hit in searched.hits:
            assert hit.evidence  # Python str indices are code points: slicing needs no conversion
            assert all(0 <= s.start < s.end <= len(hit.text) for s in hit.evidence)
        await client.delete_collection(name)


@aio
async def test_errors_carry_status_and_message(api: Api) -> None:
    async with AsyncSieveClient(api.address) as client:
        name = _name()
        await client.create_collection(name)
        with pytest.raises(sieve.AlreadyExists) as exists:
            await client.create_collection(name)
        assert exists.value.code == Code.ALREADY_EXISTS and name in exists.value.message
        with pytest.raises(sieve.InvalidArgument) as bad:
            await client.search(name, "x", top_k=100_000)
        assert bad.value.code == Code.INVALID_ARGUMENT and "top_k" in bad.value.message
        assert bad.value.attempts == 1 and bad.value.retry_delay is None
        with pytest.raises(sieve.FailedPrecondition):  # a required stage with no model configured
            await client.search(name, "x", cross_encoder="required")
        with pytest.raises(ValueError, match="stage mode"):
            await client.search(name, "x", late_interaction="sometimes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="search tier"):
            await client.search(name, "x", tier="fastest")  # type: ignore[arg-type]
        await client.delete_collection(name)


# -- fake servers: deadlines, RetryInfo, what is never retried, TLS and the API key -----------------
def _retry_info_trailer(code: Code, message: str, delay_s: float) -> tuple[tuple[str, bytes], ...]:
    detail = any_pb2.Any()
    seconds = int(delay_s)
    nanos = int(round((delay_s - seconds) * 1e9))
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


class FakeSearch(search_pb2_grpc.SearchServiceServicer):
    """Answers from a script: each entry (code, message, retry_delay or None) fails one call; ("sleep", s)
    sleeps; when the script is empty it answers. Records time remaining and metadata of every call."""

    def __init__(self) -> None:
        self.script: list[tuple[object, ...]] = []
        self.calls: list[tuple[float, float | None, dict[str, str]]] = []

    async def Search(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append((time.monotonic(), context.time_remaining(), dict(context.invocation_metadata())))
        if self.script:
            step = self.script.pop(0)
            if step[0] == "sleep":
                await asyncio.sleep(float(step[1]))  # type: ignore[arg-type]
            else:
                code, message, delay = step
                trailer = () if delay is None else _retry_info_trailer(code, message, delay)  # type: ignore[arg-type]
                await context.abort(code, message, trailing_metadata=trailer)
        return search_pb2.SearchResponse(generation=7)


class FakeCollections(collections_pb2_grpc.CollectionServiceServicer):
    def __init__(self) -> None:
        self.script: list[tuple[Code, str, float | None]] = []
        self.calls = 0

    async def CreateCollection(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.script:
            code, message, delay = self.script.pop(0)
            trailer = () if delay is None else _retry_info_trailer(code, message, delay)
            await context.abort(code, message, trailing_metadata=trailer)
        return collections_pb2.CreateCollectionResponse(collection=request.collection)


class Fake:
    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server, self.port = server, port
        self.address = f"127.0.0.1:{port}"
        self.search = FakeSearch()
        self.collections = FakeCollections()


async def _start_fake(credentials: grpc.ServerCredentials | None = None) -> Fake:
    server = grpc.aio.server()
    port = (
        server.add_insecure_port("127.0.0.1:0")
        if credentials is None
        else server.add_secure_port("127.0.0.1:0", credentials)
    )
    fake = Fake(server, port)
    search_pb2_grpc.add_SearchServiceServicer_to_server(fake.search, server)
    collections_pb2_grpc.add_CollectionServiceServicer_to_server(fake.collections, server)
    await server.start()
    return fake


@pytest_asyncio.fixture(loop_scope="session")
async def fake() -> AsyncIterator[Fake]:
    running = await _start_fake()
    yield running
    await running.server.stop(0)


@aio
async def test_every_call_has_a_deadline(fake: Fake) -> None:
    with SieveClient(fake.address) as client:
        await asyncio.to_thread(client.search, "c", "q")
        await asyncio.to_thread(client.search, "c", "q", timeout=2.5)
        fake.search.script = [("sleep", 1.0)]
        started = time.monotonic()
        with pytest.raises(sieve.DeadlineExceeded) as err:
            await asyncio.to_thread(client.search, "c", "q", timeout=0.3)
        assert time.monotonic() - started < 0.9 and err.value.code == Code.DEADLINE_EXCEEDED
    async with AsyncSieveClient(fake.address, timeouts=sieve.Timeouts(default=4.0)) as aclient:
        await aclient.search("c", "q")
    remaining = [c[1] for c in fake.search.calls]
    assert remaining[0] is not None and 9.0 < remaining[0] <= 10.1  # the default deadline, 10 s
    assert remaining[1] is not None and 2.0 < remaining[1] <= 2.6
    assert remaining[3] is not None and 3.0 < remaining[3] <= 4.1


@aio
async def test_retry_info_is_honoured(fake: Fake) -> None:
    fake.search.script = [(Code.RESOURCE_EXHAUSTED, "too many concurrent searches", 0.4)]
    with SieveClient(fake.address) as client:
        response = await asyncio.to_thread(client.search, "c", "q")
    assert response.generation == 7 and len(fake.search.calls) == 2
    waited = fake.search.calls[1][0] - fake.search.calls[0][0]
    assert 0.4 <= waited < 1.5

    # asyncio: a delay longer than the time left ends the call at once with the server's error.
    fake.search.script = [(Code.RESOURCE_EXHAUSTED, "full", 5.0)]
    async with AsyncSieveClient(fake.address) as aclient:
        started = time.monotonic()
        with pytest.raises(sieve.ResourceExhausted) as err:
            await aclient.search("c", "q", timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert err.value.retry_delay == pytest.approx(5.0) and err.value.attempts == 1
    assert isinstance(err.value.details[0], error_details_pb2.RetryInfo)


@aio
async def test_unavailable_is_retried_with_backoff_for_idempotent_calls(fake: Fake) -> None:
    fake.search.script = [(Code.UNAVAILABLE, "busy", None)] * 3
    async with AsyncSieveClient(fake.address, retry=FAST_RETRY) as client:
        assert (await client.search("c", "q")).generation == 7
    assert len(fake.search.calls) == 4
    # Attempts run out: the last error is raised and says how many calls were made.
    fake.search.script = [(Code.UNAVAILABLE, "busy", None)] * 3
    sync = SieveClient(fake.address, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01))
    with sync, pytest.raises(sieve.Unavailable) as err:
        await asyncio.to_thread(sync.search, "c", "q")
    assert err.value.attempts == 2 and "after 2 attempts" in str(err.value)


@aio
async def test_non_idempotent_calls_are_retried_only_when_refused(fake: Fake) -> None:
    async with AsyncSieveClient(fake.address, retry=FAST_RETRY) as client:
        # UNAVAILABLE without RetryInfo: the server may have done the work; CreateCollection is not repeated.
        fake.collections.script = [(Code.UNAVAILABLE, "connection reset", None)]
        with pytest.raises(sieve.Unavailable):
            await client.create_collection("x")
        assert fake.collections.calls == 1
        # With RetryInfo the server says it refused before doing anything: repeated.
        fake.collections.script = [
            (Code.UNAVAILABLE, "starting", 0.05),
            (Code.RESOURCE_EXHAUSTED, "full", 0.05),
        ]
        assert (await client.create_collection("x")).name == "x"
        assert fake.collections.calls == 4


@aio
async def test_message_too_large_is_not_retried(api: Api) -> None:
    options = [("grpc.max_send_message_length", 2000)]
    async with AsyncSieveClient(api.address, options=options, retry=FAST_RETRY) as client:
        with pytest.raises(sieve.ResourceExhausted) as err:
            await client.upsert_documents("anything", [{"id": "big", "text": "x" * 5000}])
    assert err.value.attempts == 1


@aio
async def test_a_server_that_starts_late(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A call to a server that is not listening yet (connection refused), then starting (its UNAVAILABLE
    gate while it loads the collections), succeeds once it serves."""
    caplog.set_level(logging.INFO, logger="sieve.client")
    port = free_port()
    client = SieveClient(f"127.0.0.1:{port}", retry=PATIENT, options=QUICK_RECONNECT)
    listing = asyncio.create_task(asyncio.to_thread(client.list_collections, timeout=60))
    await asyncio.sleep(1.0)
    assert not listing.done()
    server = SieveServer(make_settings(tmp_path, grpc_address=f"127.0.0.1:{port}"))
    # The server listens at once and refuses with UNAVAILABLE until its collections are loaded; hold the
    # loading until the calls have met that refusal.
    loaded, load = asyncio.Event(), server.engine.start

    async def held_load() -> None:
        await loaded.wait()
        await load()

    server.engine.start = held_load  # type: ignore[method-assign]
    starting = asyncio.create_task(server.start())
    # CreateCollection is not idempotent; the start-up refusal is sent before any work, so it is retried.
    creating = asyncio.create_task(asyncio.to_thread(client.create_collection, "late", timeout=60))
    await asyncio.sleep(1.0)
    assert not creating.done() and not listing.done()
    loaded.set()
    try:
        await starting
        assert (await creating).name == "late"
        assert isinstance(await listing, list)
    finally:
        client.close()
        await server.stop(grace=1)
    retried = [r.getMessage() for r in caplog.records if r.name == "sieve.client"]
    assert any("ListCollections" in m and "failed to connect" in m.lower() for m in retried), retried
    assert any("CreateCollection" in m and "server is starting" in m for m in retried), retried


@aio
async def test_create_is_retried_while_nothing_listens() -> None:
    """CreateCollection is not idempotent, but a request that was never sent can be: the call waits
    out a server that is not listening yet, and the server sees it once."""
    port = free_port()
    client = AsyncSieveClient(f"127.0.0.1:{port}", retry=PATIENT, options=QUICK_RECONNECT)
    creating = asyncio.create_task(client.create_collection("late", timeout=30))
    await asyncio.sleep(1.0)
    assert not creating.done()
    server = grpc.aio.server()
    server.add_insecure_port(f"127.0.0.1:{port}")
    collections = FakeCollections()
    collections_pb2_grpc.add_CollectionServiceServicer_to_server(collections, server)
    await server.start()
    try:
        assert (await creating).name == "late" and collections.calls == 1
    finally:
        await client.close()
        await server.stop(0)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return key, cert


@aio
async def test_tls_and_api_key(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    fake = await _start_fake(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    try:
        with SieveClient(fake.address, root_certificates=cert, api_key="s3cret") as client:
            assert client.tls is True
            assert (await asyncio.to_thread(client.search, "c", "q")).generation == 7
        async with AsyncSieveClient(fake.address, tls=True, root_certificates=cert.read_bytes()) as aclient:
            assert (await aclient.search("c", "q")).generation == 7
        assert fake.search.calls[0][2].get(sieve.API_KEY_HEADER) == "Bearer s3cret"
        assert sieve.API_KEY_HEADER not in fake.search.calls[1][2]
        # Plaintext against a TLS port never gets an answer.
        plain = SieveClient(fake.address, retry=RetryPolicy(max_attempts=1))
        assert plain.tls is False
        with pytest.raises(sieve.SieveError):
            await asyncio.to_thread(plain.search, "c", "q", timeout=2)
        plain.close()
    finally:
        await fake.server.stop(0)


# -- retry rules, without a server -----------------------------------------------------------------
def test_retry_rules() -> None:
    search, create, upload = (
        "/sieve.v1.SearchService/Search",
        "/sieve.v1.CollectionService/CreateCollection",
        "/sieve.v1.JobService/UploadIndexJob",
    )
    assert is_retryable(search, Code.UNAVAILABLE, "x", None)
    assert is_retryable(search, Code.RESOURCE_EXHAUSTED, "busy", None)
    assert not is_retryable(
        search, Code.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)", None
    )
    assert not is_retryable(search, Code.INVALID_ARGUMENT, "x", 1.0)
    assert not is_retryable(search, Code.DEADLINE_EXCEEDED, "x", None)
    assert not is_retryable(create, Code.UNAVAILABLE, "connection reset", None)
    assert is_retryable(create, Code.UNAVAILABLE, "connection reset", 0.5)
    assert is_retryable(create, Code.UNAVAILABLE, "server is starting; retry shortly", None)
    assert is_retryable(create, Code.UNAVAILABLE, "failed to connect to all addresses; last error", None)
    assert not is_retryable(upload, Code.UNAVAILABLE, "failed to connect to all addresses", 0.5)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.3)
    assert next_wait(policy, 1, 0.25, 10.0) == 0.25
    assert next_wait(policy, 1, 0.25, 0.2) is None  # would pass the deadline
    assert next_wait(policy, 3, None, 10.0) is None  # attempts used up
    assert next_wait(policy, 1, 60.0, 100.0) is None  # longer than max_retry_delay
    waits = [next_wait(policy, n, None, 10.0) for n in (1, 2) for _ in range(50)]
    assert all(w is not None and 0 <= w <= 0.3 for w in waits) and len(set(waits)) > 10


# -- the examples and the CLI, as a user runs them -------------------------------------------------
async def _run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


@aio
async def test_python_examples_run(api: Api) -> None:
    for script in ("quickstart.py", "walkthrough.py"):
        code, out, err = await _run(
            sys.executable, f"examples/python/{script}", "--address", api.address, "--collection", _name()
        )
        assert code == 0, out + err
    assert "DEGRADED" in out and "job" in out and "SUCCEEDED" in out


@aio
async def test_cli_client_commands(api: Api, tmp_path: Path) -> None:
    name = _name()
    sieve_cmd = [sys.executable, "-m", "sieve_cli.main"]
    addr = ["--address", api.address]

    async def run(*args: str) -> tuple[int, str, str]:
        return await _run(*sieve_cmd, *args, *addr)

    assert (await run("collections", "create", name, "--late", "off"))[0] == 0
    code, out, _ = await run("collections", "list", "--json")
    assert code == 0 and name in [c["name"] for c in json.loads(out)]
    code, out, err = await run("docs", "upsert", name, str(NOTES))
    assert code == 0 and "20" in out, err
    code, out, err = await run("search", "light and energy", "--collection", name, "--top-k", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["hits"][0]["id"] == "photon" and result["stages"][0]["stage"] == "STAGE_RETRIEVE"
    code, out, err = await run(
        "search", "light and energy", "--collection", name, "--late", "--candidates", "10"
    )
    assert code == 0 and "photon" in out and "late_interaction" in out and "degraded" in out, out + err
    code, out, _ = await run("docs", "get", name, "photon", "nope", "--json")
    assert code == 0 and json.loads(out)["missing_ids"] == ["nope"]
    assert (await run("docs", "delete", name, "photon"))[0] == 0
    code, out, _ = await run("collections", "get", name, "--json")
    assert code == 0 and json.loads(out)["document_count"] == "19"
    code, _, err = await run("search", "x", "--collection", "no-such-collection")
    assert code == 1 and "NOT_FOUND" in err
    assert (await run("collections", "delete", name))[0] == 0


@aio
async def test_cli_streams_and_highlights_evidence(api: Api) -> None:
    name = _name()
    sieve_cmd = [sys.executable, "-m", "sieve_cli.main"]
    addr = ["--address", api.address]

    async def run(*args: str) -> tuple[int, str, str]:
        return await _run(*sieve_cmd, *args, *addr)

    assert (await run("collections", "create", name, "--late", "best_effort"))[0] == 0
    assert (await run("docs", "upsert", name, str(NOTES)))[0] == 0
    code, out, err = await run("search", "light and energy", "--collection", name, "-k", "3", "--stream")
    assert code == 0, err
    lines = out.splitlines()
    assert "retrieve" in lines[0] and "late_interaction" in lines[1] and "final" in lines[1], out
    assert "evidence" in out and "photon" in out
    code, out, err = await run("search", "light", "--collection", name, "--tier", "fast", "--json")
    assert code == 0 and json.loads(out)["stages"][0]["plan"].startswith("budget 25 ms"), err
    assert (await run("collections", "delete", name))[0] == 0


def test_cli_highlights_the_evidence_spans() -> None:
    from rich.console import Console

    from sieve_cli.render import EVIDENCE_STYLE, show_search

    text = "🌞 Sunlight is energy: a photon carries light energy."
    hit = search_pb2.Hit(id="photon", score=1.0, text=text)
    for word in ("photon", "light energy"):
        start = text.index(word)  # Python str indices are the code points the server sends
        hit.evidence.add(start=start, end=start + len(word), score=0.5)
    console = Console(record=True, force_terminal=True, width=200, color_system="truecolor")
    show_search(search_pb2.SearchResponse(hits=[hit]), 1.0, console)
    styled = {
        seg.text
        for seg in console._record_buffer
        if seg.style and seg.style == console.get_style(EVIDENCE_STYLE)
    }
    assert {"photon", "light energy"} <= styled, styled


# -- generated code of both clients matches the protos ---------------------------------------------
def test_python_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_node_generated_code_matches_protos() -> None:
    if not (NODE_DIR / "node_modules" / ".bin" / "buf").exists():
        pytest.fail("clients/node has no node_modules: run `make node` (make test does)")
    result = subprocess.run(
        ["npm", "run", "--silent", "check-gen"], cwd=NODE_DIR, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
