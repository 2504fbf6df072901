"""What operators rely on, against real servers: request ids, the in-flight limit and its RetryInfo,
undecodable requests, Prometheus metrics, and graceful shutdown of a real `sieve serve` process."""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sieve import AsyncSieveClient, ResourceExhausted, RetryPolicy
from sieve.errors import from_rpc_error
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, jobs_pb2, jobs_pb2_grpc, search_pb2

from server.transport.interceptors import FrontDoor
from sieve_cli.stack import free_port
from sieve_core.logs import REQUEST_ID_METADATA, request_id
from tests.conftest import Api, RedisServer, Worker, make_settings, start_api, stop_api
from tests.system.test_durability import running_server

LIMIT = 2


def _trailer(metadata: object, key: str) -> object:
    return dict(metadata or ()).get(key)  # type: ignore[call-overload]


async def _until(predicate, what: str, within_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    # Generous: the machine is shared and loaded; these waits are for the server to reach a state, not timings.
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the interceptor on a bare grpc.aio server (handlers that report what they see) ------------------


class _Probe:
    """A real grpc.aio server with only the FrontDoor interceptor and two test handlers."""

    def __init__(self, front: FrontDoor) -> None:
        self.front = front
        self.server = grpc.aio.server(interceptors=[front])

        async def rid(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await asyncio.sleep(0)  # the id must survive an await inside the handler
            return request_id.get().encode()

        async def boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise RuntimeError("kaboom")

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Probe",
                    {
                        "Rid": grpc.unary_unary_rpc_method_handler(rid),
                        "Boom": grpc.unary_unary_rpc_method_handler(boom),
                    },
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")


@pytest_asyncio.fixture(loop_scope="session")
async def probe() -> AsyncIterator[tuple[_Probe, grpc.aio.Channel]]:
    running = _Probe(FrontDoor(max_inflight=4, retry_after_ms=250))
    await running.server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close()
    await running.server.stop(0)


async def test_request_id_reaches_the_handler_and_comes_back(probe, caplog) -> None:  # type: ignore[no-untyped-def]
    running, channel = probe
    running.front.ready = True
    rid = channel.unary_unary("/test.Probe/Rid")

    call = rid(b"", metadata=((REQUEST_ID_METADATA, "client-chosen-42"),))
    assert await call == b"client-chosen-42"
    assert _trailer(await call.trailing_metadata(), REQUEST_ID_METADATA) == "client-chosen-42"

    # No id, an empty one, or one too long for a log line: the server makes one.
    for sent in ((), ((REQUEST_ID_METADATA, "x" * 500),), ((REQUEST_ID_METADATA, ""),)):
        call = rid(b"", metadata=sent)
        seen = (await call).decode()
        assert len(seen) == 16 and seen != "x" * 500
        assert _trailer(await call.trailing_metadata(), REQUEST_ID_METADATA) == seen

    # An unexpected error: INTERNAL naming the request id as the incident, the traceback logged with it.
    boom = channel.unary_unary("/test.Probe/Boom")
    with caplog.at_level(logging.ERROR, logger="sieve.server"), pytest.raises(grpc.aio.AioRpcError) as err:
        await boom(b"", metadata=((REQUEST_ID_METADATA, "inc-7"),))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "incident inc-7" in err.value.details() and "kaboom" not in err.value.details()
    assert _trailer(err.value.trailing_metadata(), REQUEST_ID_METADATA) == "inc-7"
    assert any("inc-7" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_refused_while_starting_with_retry_info(probe) -> None:  # type: ignore[no-untyped-def]
    running, channel = probe
    running.front.ready = False
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary("/test.Probe/Rid")(b"", metadata=((REQUEST_ID_METADATA, "early"),))
    error = from_rpc_error(err.value, "/test.Probe/Rid")
    assert error.code == grpc.StatusCode.UNAVAILABLE and "server is starting" in error.message
    assert error.retry_delay == pytest.approx(0.25)
    assert _trailer(err.value.trailing_metadata(), REQUEST_ID_METADATA) == "early"


# -- the in-flight limit and undecodable requests on a real Sieve server ----------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def small(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """A server with room for LIMIT calls; Search with a future min_generation waits (up to 60 s) until
    a write reaches it, which gives calls that stay in progress for as long as a test needs."""
    settings = make_settings(
        tmp_path_factory.mktemp("small"),
        max_inflight_requests=LIMIT,
        min_generation_wait_s=60,
        overload_retry_after_ms=100,
    )
    running = await start_api(settings)
    yield running
    await stop_api(running)


async def _collection(api: Api, token_storage: bool = False) -> tuple[str, int]:
    name = f"ops-{uuid.uuid4().hex[:8]}"
    collection = collections_pb2.Collection(name=name)
    if token_storage:  # stores late-interaction token vectors
        collection.token_storage.SetInParent()
    await api.collections.CreateCollection(collections_pb2.CreateCollectionRequest(collection=collection))
    written = await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name, documents=[documents_pb2.Document(id="a", text="a first document")]
        )
    )
    return name, written.generation


def _waiting_search(api: Api, name: str, generation: int) -> grpc.aio.UnaryUnaryCall:
    request = search_pb2.SearchRequest(collection=name, query="first", min_generation=generation)
    return api.search.Search(request, timeout=90)


async def test_calls_past_the_limit_are_refused_with_retry_info(small: Api) -> None:
    name, generation = await _collection(small)
    front = small.server.front
    waiting = [_waiting_search(small, name, generation + 1) for _ in range(LIMIT)]
    await _until(lambda: front.calls.used == LIMIT, "both searches to be in progress")

    for attempt in (
        small.search.Search(search_pb2.SearchRequest(collection=name, query="x")),
        small.collections.ListCollections(collections_pb2.ListCollectionsRequest()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await attempt
        error = from_rpc_error(err.value, "/sieve.v1.SearchService/Search")
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"limit of {LIMIT}" in error.message
        assert error.retry_delay == pytest.approx(0.1)
        assert _trailer(err.value.trailing_metadata(), REQUEST_ID_METADATA)

    # Health is never limited, and WatchJob has its own pool: it gets its real answer.
    health = health_pb2_grpc.HealthStub(small.channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest())
    ).status == health_pb2.HealthCheckResponse.SERVING
    watch = jobs_pb2_grpc.JobServiceStub(small.channel).WatchJob(jobs_pb2.WatchJobRequest(id="0" * 16))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in watch:
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # A cancelled call gives its slot back; the freed slot takes a write that releases the other search.
    waiting[1].cancel()
    await _until(lambda: front.calls.used == LIMIT - 1, "the cancelled call's slot to be released")
    await small.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name, documents=[documents_pb2.Document(id="b", text="a second document")]
        )
    )
    answered = await waiting[0]
    assert answered.generation == generation + 1
    await _until(lambda: front.calls.used == 0, "every slot to be free")


async def test_python_client_retries_an_overload_refusal(small: Api) -> None:
    name, generation = await _collection(small)
    front = small.server.front
    waiting = [_waiting_search(small, name, generation + 1) for _ in range(LIMIT)]
    await _until(lambda: front.calls.used == LIMIT, "both searches to be in progress")
    async with AsyncSieveClient(small.address, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(ResourceExhausted) as err:
            await client.search(name, "first")
        assert err.value.retry_delay == pytest.approx(0.1) and err.value.attempts == 1

    def refused() -> float:
        return (
            small.server.metrics.registry.get_sample_value("sieve_refused_total", {"reason": "overload"}) or 0
        )

    refused_before = refused()
    # Plenty of attempts at the server's 100 ms: the client keeps trying until a slot frees.
    async with AsyncSieveClient(small.address, retry=RetryPolicy(max_attempts=200)) as client:
        searching = asyncio.create_task(client.search(name, "first", timeout=60))
        await _until(lambda: refused() >= refused_before + 2, "the client to be refused twice")
        for call in waiting:
            call.cancel()
        answer = await searching
    assert [h.id for h in answer.hits] == ["a"]


async def test_undecodable_requests_are_invalid_argument(small: Api) -> None:
    junk = b"\xff\xff\xff\xff"
    md = ((REQUEST_ID_METADATA, "junk-1"),)
    unary = small.channel.unary_unary("/sieve.v1.SearchService/Search")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(junk, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sieve.v1.SearchRequest" in err.value.details()
    assert _trailer(err.value.trailing_metadata(), REQUEST_ID_METADATA) == "junk-1"

    stream = small.channel.unary_stream("/sieve.v1.JobService/WatchJob")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream(junk, metadata=md):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def chunks() -> AsyncIterator[bytes]:
        yield junk

    upload = small.channel.stream_unary("/sieve.v1.JobService/UploadIndexJob")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(chunks(), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sieve.v1.UploadIndexJobRequest" in err.value.details()

    # The same path with valid bytes still works (an empty message is a valid ListCollectionsRequest).
    listed = await small.channel.unary_unary("/sieve.v1.CollectionService/ListCollections")(b"")
    assert isinstance(listed, bytes)
    await _until(lambda: small.server.front.calls.used == 0, "every slot to be free")


# -- Prometheus metrics: a server with the endpoint, a real Redis and a real worker ------------------


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics over HTTP (from a thread: the scrape asks the server's event loop for state)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def metered(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, worker: Worker
) -> AsyncIterator[Api]:
    settings = make_settings(
        tmp_path_factory.mktemp("metered"), metrics_address="127.0.0.1:0", redis_url=redis_url
    )
    running = await start_api(settings)
    yield running
    await stop_api(running)


async def test_metrics_endpoint(metered: Api, redis_server: RedisServer) -> None:
    port = metered.server.metrics.port
    assert port
    name, _ = await _collection(metered, token_storage=True)
    late = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
    no_model = common_pb2.SearchSettings(cross_encoder=common_pb2.STAGE_MODE_BEST_EFFORT)  # none configured
    answers = []
    for settings in (late, late, no_model):
        request = search_pb2.SearchRequest(collection=name, query="first", settings=settings)
        answers.append(await metered.search.Search(request, timeout=60))
    # What the responses said, to compare with what the metrics counted.
    assert [a.stages[1].query_token_source for a in answers[:2]] == ["encoder pass", "cache"]
    token_bytes = answers[0].stages[1].token_bytes
    assert token_bytes > 0 and answers[1].stages[1].token_bytes == token_bytes
    assert answers[2].stages[-1].status == search_pb2.STAGE_STATUS_DEGRADED
    with pytest.raises(grpc.aio.AioRpcError):
        await metered.collections.GetCollection(
            collections_pb2.GetCollectionRequest(name="no-such-collection")
        )
    queue = redis.Redis.from_url(redis_server.url)
    queue.lpush("cross_encoder", b"not a task")  # no worker reads this queue here

    samples = await asyncio.to_thread(_scrape, port)
    search = "sieve.v1.SearchService/Search"
    assert _value(samples, "sieve_requests_total", method=search, code="OK") == 3
    assert _value(samples, "sieve_request_seconds_count", method=search) == 3
    get = "sieve.v1.CollectionService/GetCollection"
    assert _value(samples, "sieve_requests_total", method=get, code="NOT_FOUND") == 1
    assert _value(samples, "sieve_stage_results_total", stage="retrieve", status="COMPLETED") == 3
    assert _value(samples, "sieve_stage_results_total", stage="late_interaction", status="COMPLETED") == 2
    assert _value(samples, "sieve_stage_results_total", stage="cross_encoder", status="DEGRADED") == 1
    assert _value(samples, "sieve_stage_seconds_count", stage="late_interaction") == 2
    # Late interaction: one candidate's token vectors read from the store per search, bytes and the
    # query's token vectors' source counted.
    assert _value(samples, "sieve_late_interaction_token_vectors_total", source="store") == 2
    assert (_value(samples, "sieve_late_interaction_token_vectors_total", source="pending") or 0) == 0
    assert _value(samples, "sieve_late_interaction_token_bytes_total", source="store") == 2 * token_bytes
    assert _value(samples, "sieve_late_interaction_query_tokens_total", source="encoder pass") == 1
    assert _value(samples, "sieve_late_interaction_query_tokens_total", source="cache") == 1
    assert _value(samples, "sieve_collection_tokens_pending", collection=name) == 0
    assert _value(samples, "sieve_degraded_searches_total") == 1
    assert _value(samples, "sieve_inflight_requests") == 0
    assert _value(samples, "sieve_collection_documents", collection=name) == 1
    assert _value(samples, "sieve_jobs", state="running") == 0
    assert _value(samples, "sieve_redis_up") == 1
    assert _value(samples, "sieve_queue_depth", queue="cross_encoder") == 1
    assert _value(samples, "sieve_queue_depth", queue="colbert") == 0
    assert (_value(samples, "process_resident_memory_bytes") or 0) > 0
    queue.delete("cross_encoder")

    # Redis gone: the scrape still answers, says so, and leaves the queue depths out.
    redis_server.stop()
    try:
        samples = await asyncio.to_thread(_scrape, port)
        assert _value(samples, "sieve_redis_up") == 0
        assert not [key for key in samples if key[0] == "sieve_queue_depth"]
        assert _value(samples, "sieve_collection_documents", collection=name) == 1
    finally:
        redis_server.start()


async def test_an_unusable_metrics_address_is_logged_and_serving_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with caplog.at_level(logging.ERROR, logger="sieve.server"):
            api = await start_api(make_settings(tmp_path, metrics_address=address))
        try:
            assert api.server.metrics.port is None
            assert any(
                r.levelno == logging.ERROR
                and "SIEVE_METRICS_ADDRESS" in r.getMessage()
                and address in r.getMessage()
                for r in caplog.records
            )
            await api.collections.ListCollections(collections_pb2.ListCollectionsRequest())
        finally:
            await stop_api(api)


# -- graceful shutdown of a real `sieve serve` process ------------------------------------------------

GRACE_S = 3.0


def _uploads(source: queue.Queue) -> Iterator[jobs_pb2.UploadIndexJobRequest]:  # type: ignore[type-arg]
    """An UploadIndexJob request stream that stays open until the test puts None."""
    while (request := source.get()) is not None:
        yield request


def _scrape_until(port: int, name: str, value: float, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while _value(_scrape(port), name) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not reach {value}")
        time.sleep(0.05)


def test_sigterm_refuses_new_calls_drains_running_ones_then_exits(tmp_path: Path) -> None:
    """Two uploads are in progress at SIGTERM: one the client finishes afterwards (it must succeed), one the
    client holds open (the server must give up on it after SIEVE_SHUTDOWN_GRACE_S and still exit 0)."""
    metrics_port = free_port()
    env = {"SIEVE_SHUTDOWN_GRACE_S": str(GRACE_S), "SIEVE_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    log = tmp_path / "server.log"
    with running_server(tmp_path / "data", log, **env) as server:
        server.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name="drain")),
            timeout=60,
        )
        channel = grpc.insecure_channel(server.address)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        finishing: queue.Queue = queue.Queue()  # type: ignore[type-arg]
        stuck: queue.Queue = queue.Queue()  # type: ignore[type-arg]
        try:
            finishing_call = jobs.UploadIndexJob.future(_uploads(finishing), timeout=120)
            stuck_call = jobs.UploadIndexJob.future(_uploads(stuck), timeout=120)
            for source, doc in ((finishing, "d1"), (stuck, "s1")):
                source.put(
                    jobs_pb2.UploadIndexJobRequest(
                        collection="drain", documents=[documents_pb2.Document(id=doc, text=f"text of {doc}")]
                    )
                )
            _scrape_until(metrics_port, "sieve_inflight_requests", 2)

            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != (
                health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert time.monotonic() < deadline, "health did not go NOT_SERVING after SIGTERM"
                time.sleep(0.02)

            # A new call is refused before any work, with a RetryInfo.
            with pytest.raises(grpc.RpcError) as err:
                server.collections.ListCollections(collections_pb2.ListCollectionsRequest(), timeout=10)
            refused = from_rpc_error(err.value, "/sieve.v1.CollectionService/ListCollections")
            assert refused.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.message
            assert refused.retry_delay == pytest.approx(0.1)

            # The upload already in progress finishes normally.
            finishing.put(
                jobs_pb2.UploadIndexJobRequest(documents=[documents_pb2.Document(id="d2", text="more")])
            )
            finishing.put(None)
            job = finishing_call.result(timeout=60).job
            assert job.collection == "drain" and job.total == 2

            # The held one keeps the server for the grace period, no longer: then it is cancelled.
            code = server.proc.wait(timeout=GRACE_S + 60)  # generous: snapshots and a loaded machine
            waited = time.monotonic() - signalled
            assert code == 0, log.read_text(errors="replace")
            assert waited >= GRACE_S - 0.1, "the server did not wait for the call still in progress"
            with pytest.raises(grpc.RpcError) as err:
                stuck_call.result(timeout=30)
            assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        finally:
            stuck.put(None)
            finishing.put(None)
            channel.close()
    text = log.read_text(errors="replace")
    assert "calls still in progress after 3.0 s: 1; cancelling them" in text
    assert text.index("cancelling them") < text.rindex("stopped")
