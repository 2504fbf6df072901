"""Hostile input, fuzzed against a live server (issue 7): client mistakes never come back as INTERNAL or
UNKNOWN, the server does not crash or leak memory, and it stays SERVING with its data intact.

One real `sieve serve` process (tests.system.test_durability.running_server) with a real Redis and a real Celery
worker (embed + colbert queues, so late-interaction settings, token storage and index jobs run for
real), seeded with two collections the fuzzer only reads, two scratch collections it may write to and
delete, and finished jobs. Then:

- test_generated_requests: hypothesis draws calls of every RPC from tests/fuzz_strategies.py (mostly valid
  requests naming real collections, ids and jobs, with odd Unicode, extreme numbers, long lists and odd map
  keys mixed in; some with broken encodings, some raw bytes) and sends them BATCH at a time concurrently.
  The same derandomized mix runs twice: RSS after the first run (the warm-up) vs after the second.
  SIEVE_FUZZ_REQUESTS (default below) is the total over both runs.
- test_raw_bytes: a fixed corpus of undecodable and extreme payloads to every method (random bytes,
  truncated messages, wrong wire types, nesting past protobuf's recursion limit, huge repeated fields,
  messages just under and just over the server's size limit).

The oracle for every call: OK, or a status a client mistake may get (see `problem`), with a short,
non-empty, valid UTF-8 message. Never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, jobs_pb2, jobs_pb2_grpc, search_pb2

from tests.fuzz_strategies import (
    Builder,
    Call,
    Pools,
    Rpc,
    all_rpcs,
    describe,
    hints_for,
    length_delimited,
    mix,
    raw_corpus,
    tag,
    varint,
)
from tests.system.test_durability import WORDS, Client, Texts, running_server

REPO = Path(__file__).resolve().parents[2]
MODEL = "all-MiniLM-L6-v2"
pytestmark = pytest.mark.skipif(
    not (REPO / "models" / MODEL / "manifest.json").is_file(), reason="no model bundle; run `make models`"
)

FUZZ_REQUESTS = int(os.environ.get("SIEVE_FUZZ_REQUESTS", "10000"))  # `make fuzz` sets it higher
# Unset: hypothesis derandomized (the same calls on every run). A number: other calls, the same for that number.
FUZZ_SEED = os.environ.get("SIEVE_FUZZ_SEED", "")
BATCH = 4  # calls per hypothesis example, sent concurrently
CALL_TIMEOUT_S = 60.0  # generous: a 1000-document upsert on a busy 2-core machine takes seconds
WATCH_TIMEOUT_S = 3.0  # WatchJob of a running job streams until the job ends: a deadline is expected there
MAX_DETAILS_CHARS = 1024
MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # the server's default SIEVE_MAX_MESSAGE_BYTES
# RSS growth allowed from the end of the warm-up run to the end of the identical second run. Measured: the
# server sits at ~250 MB (ONNX session, indexes, SQLite cache) and moved by 0-1 MB over a second run of 5,000
# requests; allocator pools and caches that keep growing slowly get the rest of the margin. A leak of 6.5 KB per
# request (33 MB over 5,000) trips it; a deliberate 40 KB per Search was caught (+31 MB over only 2,000 requests).
RSS_GROWTH_LIMIT_MB = 32.0

READ = ("fz-seed-cos", "fz-seed-l2")  # never written by the fuzzer: checked intact at the end
SCRATCH = ("fz-scratch-li", "fz-scratch")
NEW = ("fz-new",)
KINDS = ("even", "odd")
LANGS = ("en", "fr", "de")

Code = grpc.StatusCode
CLIENT_MISTAKES = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
    Code.OUT_OF_RANGE,
}
# UNAVAILABLE is fine when the server says why (a REQUIRED stage whose worker was too slow, a job that is
# not loaded); not when it is the transport's ("Socket closed", "failed to connect"): that is a crash.
SERVER_REASONS = ("is required but could not run", "retry", "shutting down", "starting")


@dataclass
class Seeded:
    docs: dict[str, dict[str, tuple[str, dict[str, str]]]]  # collection -> id -> (text, metadata)
    generations: dict[str, int]
    job_ids: tuple[str, ...]


@dataclass
class Target:
    client: Client
    channel: grpc.Channel
    pools: Pools
    seeded: Seeded
    log: Path


# -- the server ------------------------------------------------------------------------------------------
def _write_sources(directory: Path) -> list[str]:
    """Small job sources (a job over them finishes in a moment) and paths that are not valid sources."""
    directory.mkdir()
    lines = [
        {"id": f"d{i}", "text": f"job line {i} {WORDS[i]}", "metadata": {"kind": KINDS[i % 2]}}
        for i in range(4)
    ]
    (directory / "small.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    (directory / "beir").mkdir()
    (directory / "beir" / "corpus.jsonl").write_text('{"_id": "b1", "title": "T", "text": "beir text"}\n')
    (directory / "nocorpus").mkdir()
    (directory / "empty.jsonl").write_text("")
    (directory / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01\n\xed\xa0\x80\n")
    return [
        str(directory / "small.jsonl"),
        str(directory / "beir"),
        str(directory / "nocorpus"),
        str(directory / "empty.jsonl"),
        str(directory / "binary.jsonl"),
        str(directory / "missing.jsonl"),
        str(directory / ("x" * 300)),
        str(directory / "a\x00b.jsonl"),
        "relative.jsonl",
        "/",
        "/etc/passwd",
        str(directory / ".." / ".." / "etc" / "passwd"),
        "",
    ]


def _channel(address: str) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    return grpc.insecure_channel(address, options=options)


def _seed(client: Client, channel: grpc.Channel, sources: list[str]) -> Seeded:
    texts = Texts(seed=77)
    li = common_pb2.SearchSettings(
        late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, late_interaction_keep=5
    )
    specs = {
        "fz-seed-cos": collections_pb2.Collection(name="fz-seed-cos", defaults=li),
        "fz-seed-l2": collections_pb2.Collection(name="fz-seed-l2", metric=common_pb2.METRIC_L2),
        "fz-scratch-li": collections_pb2.Collection(name="fz-scratch-li", defaults=li),
        "fz-scratch": collections_pb2.Collection(name="fz-scratch"),
    }
    docs: dict[str, dict[str, tuple[str, dict[str, str]]]] = {}
    generations = {}
    for name, spec in specs.items():
        client.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=spec), timeout=60
        )
        count = 30 if name in READ else 10
        docs[name] = {
            f"d{i}": (texts.new(), {"kind": KINDS[i % 2], "lang": LANGS[i % 3], "n": str(i)})
            for i in range(count)
        }
        request = documents_pb2.UpsertDocumentsRequest(
            collection=name,
            documents=[documents_pb2.Document(id=i, text=t, metadata=m) for i, (t, m) in docs[name].items()],
        )
        generations[name] = client.documents.UpsertDocuments(request, timeout=60).generation
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    started = jobs.StartIndexJob(
        jobs_pb2.StartIndexJobRequest(collection="fz-scratch", path=sources[0], batch_size=2), timeout=60
    )
    upload = [
        jobs_pb2.UploadIndexJobRequest(
            collection="fz-scratch-li", documents=[documents_pb2.Document(id="u1", text="uploaded text")]
        ),
        jobs_pb2.UploadIndexJobRequest(jsonl=b""),
    ]
    uploaded = jobs.UploadIndexJob(iter(upload), timeout=60)
    job_ids = (started.job.id, uploaded.job.id)
    for job_id in job_ids:
        job = _wait_job(jobs, job_id)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"seed job {job_id}: {job}"
    return Seeded(docs, generations, job_ids)


FINAL_JOB_STATES = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def _wait_job(jobs, job_id: str, timeout_s: float = 120) -> jobs_pb2.Job:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        job = jobs.GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=30).job
        if job.state in FINAL_JOB_STATES or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


@pytest.fixture(scope="module")
def target(redis_url: str, worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("fuzz")
    paths = _write_sources(root / "sources")
    env = {
        "SIEVE_REDIS_URL": redis_url,
        "SIEVE_DEFAULT_EMBEDDING_MODEL": MODEL,
        "SIEVE_JOB_SOURCE_DIRS": str(root / "sources"),  # fuzzed paths never make the server read elsewhere
        "SIEVE_MIN_GENERATION_WAIT_S": "0.2",  # a fuzzed min_generation far ahead waits this long, not 2 s
        "SIEVE_ONNX_THREADS": "1",  # the worker and the test process share the 2 cores
    }
    with running_server(root / "data", root / "server.log", **env) as client:
        channel = _channel(client.address)
        try:
            seeded = _seed(client, channel, paths)
            pools = Pools(
                read_collections=READ,
                write_collections=SCRATCH,
                new_collections=NEW,
                doc_ids=(*(f"d{i}" for i in range(30)), "u1", "b1", "never-seen"),
                job_ids=seeded.job_ids,
                paths=tuple(paths),
                words=WORDS,
                metadata={"kind": KINDS, "lang": LANGS, "n": ("0", "1", "29")},
                models=(MODEL,),
            )
            yield Target(client, channel, pools, seeded, root / "server.log")
        finally:
            channel.close()


# -- sending and judging ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    response: bytes | None = None  # unary responses
    messages: int = 0  # server-streaming responses


class NotUtf8Messages(logging.Handler):
    """grpc's _decode (grpc_string.pyx.pxi) turns a status message that is not UTF-8 into latin-1 and logs
    "Invalid encoding on ..." on the root logger: counting those records is how a test sees one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Invalid encoding" in record.getMessage():
            self.seen.append(record.getMessage()[:200])


@pytest.fixture(scope="module")
def not_utf8() -> Iterator[NotUtf8Messages]:
    handler = NotUtf8Messages()
    logger = logging.getLogger()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def send(
    channel: grpc.Channel, rpc: Rpc, messages: tuple[bytes, ...], timeout: float | None = None
) -> Outcome:
    no_serializer = {"request_serializer": None, "response_deserializer": None}
    if timeout is None:
        timeout = WATCH_TIMEOUT_S if rpc.server_streaming else CALL_TIMEOUT_S
    try:
        if rpc.client_streaming:
            response = channel.stream_unary(rpc.path, **no_serializer)(iter(messages), timeout=timeout)
            return Outcome(Code.OK, "", response)
        if rpc.server_streaming:
            stream = channel.unary_stream(rpc.path, **no_serializer)(messages[0], timeout=timeout)
            return Outcome(Code.OK, "", messages=sum(1 for _ in stream))
        response = channel.unary_unary(rpc.path, **no_serializer)(messages[0], timeout=timeout)
        return Outcome(Code.OK, "", response)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")


def problem(rpc: Rpc, outcome: Outcome) -> str | None:
    """Why this outcome is wrong for a client's request, or None."""
    code, details = outcome.code, outcome.details
    if code == Code.OK:
        if outcome.response is not None:
            output = message_factory.GetMessageClass(_output_type(rpc))
            try:
                output.FromString(outcome.response)
            except Exception as exc:
                return f"OK with a response that does not parse: {exc}"
        return None
    if code in (Code.INTERNAL, Code.UNKNOWN):
        return f"{code.name}: {details[:300]}"
    if code == Code.UNAVAILABLE and not any(reason in details for reason in SERVER_REASONS):
        return f"UNAVAILABLE without a server reason (a crash or a transport error?): {details[:300]}"
    if code == Code.DEADLINE_EXCEEDED and not rpc.server_streaming:
        return f"DEADLINE_EXCEEDED after {CALL_TIMEOUT_S:.0f} s: {details[:300]}"
    if code == Code.NOT_FOUND and rpc.name.startswith("List"):
        return f"NOT_FOUND from a listing (a concurrent delete?): {details[:300]}"
    if code not in CLIENT_MISTAKES | {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED}:
        return f"unexpected status {code.name}: {details[:300]}"
    if not details.strip():
        return f"{code.name} with an empty message"
    if len(details) > MAX_DETAILS_CHARS:
        return f"{code.name} with a {len(details)}-character message: {details[:200]}..."
    return None


def _output_type(rpc: Rpc):  # type: ignore[no-untyped-def]
    service, method = rpc.path.strip("/").split("/")
    for module in (collections_pb2, documents_pb2, search_pb2, jobs_pb2):
        for svc in module.DESCRIPTOR.services_by_name.values():
            if svc.full_name == service:
                return svc.methods_by_name[method].output_type
    raise KeyError(rpc.path)


@dataclass
class Tally:
    requests: int = 0
    by_code: Counter[str] = None  # type: ignore[assignment]
    by_rpc: Counter[tuple[str, str]] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.by_code, self.by_rpc = Counter(), Counter()

    def add(self, call: Call, outcome: Outcome) -> None:
        self.requests += 1
        self.by_code[outcome.code.name] += 1
        self.by_rpc[(call.rpc.name, outcome.code.name)] += 1

    def report(self, title: str) -> str:
        lines = [f"{title}: {self.requests} requests", "  by status: " + _fmt(self.by_code)]
        for name in sorted({rpc for rpc, _ in self.by_rpc}):
            codes = Counter({code: n for (rpc, code), n in self.by_rpc.items() if rpc == name})
            lines.append(f"  {name:<17} {_fmt(codes)}")
        return "\n".join(lines)


def _fmt(counter: Counter[str]) -> str:
    return ", ".join(f"{code} {n}" for code, n in counter.most_common())


# -- checks on the server as a whole ---------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def assert_serving(target: Target) -> None:
    assert target.client.proc.poll() is None, f"the server exited:\n{_log_tail(target)}"
    health = health_pb2_grpc.HealthStub(target.channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING, f"health says {status}"


def _log_tail(target: Target) -> str:
    return target.log.read_text(errors="replace")[-4000:]


def wait_jobs_idle(target: Target, timeout_s: float = 120) -> None:
    """Let the jobs the fuzzer started finish, so that both RSS readings see the same quiet server."""
    jobs = jobs_pb2_grpc.JobServiceStub(target.channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=1000), timeout=30).jobs
        if all(j.state in FINAL_JOB_STATES for j in listed):
            return
        time.sleep(0.5)


def assert_no_internal_job_errors(target: Target) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(target.channel)
    listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=1000), timeout=30).jobs
    bad = [(j.id, j.reason) for j in listed if "internal error" in j.reason]
    assert not bad, f"jobs failed with internal errors: {bad[:5]}\n{_log_tail(target)}"


def assert_seeded_intact(target: Target) -> None:
    """Nothing the fuzzer did reached the read-only collections; every seeded document is still searchable."""
    client = target.client
    for name in READ:
        docs = target.seeded.docs[name]
        info = client.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name), timeout=30)
        assert info.collection.document_count == len(docs), name
        assert info.collection.generation == target.seeded.generations[name], name
        got = client.documents.GetDocuments(
            documents_pb2.GetDocumentsRequest(collection=name, ids=sorted(docs)), timeout=30
        )
        assert not got.missing_ids, f"{name}: lost {list(got.missing_ids)}"
        for doc in got.documents:
            assert (doc.text, dict(doc.metadata)) == docs[doc.id], f"{name}/{doc.id} changed"
        found = []
        for kind in KINDS:
            response = client.search.Search(
                search_pb2.SearchRequest(
                    collection=name,
                    query="river coffee",
                    top_k=len(docs),
                    omit_documents=True,
                    filter=common_pb2.Filter(all=[common_pb2.Condition(key="kind", equals=kind)]),
                    settings=common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_OFF),
                ),
                timeout=30,
            )
            found += [h.id for h in response.hits]
        assert sorted(found) == sorted(docs), f"{name}: search finds {len(found)} of {len(docs)} documents"
        for doc_id, (text, _) in docs.items():
            response = client.search.Search(
                search_pb2.SearchRequest(
                    collection=name,
                    query=text,
                    top_k=3,
                    settings=common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_OFF),
                ),
                timeout=30,
            )
            assert response.hits[0].id == doc_id, (
                f"{name}: its own text finds {[h.id for h in response.hits]}"
            )


def unhandled_errors_in_log(target: Target) -> list[str]:
    return [line for line in target.log.read_text(errors="replace").splitlines() if "unhandled error" in line]


# -- the tests -------------------------------------------------------------------------------------------
def run_generated(
    target: Target, examples: int, tally: Tally, pool: ThreadPoolExecutor, not_utf8: NotUtf8Messages
) -> None:
    """`examples` hypothesis examples of BATCH concurrent calls each; the same calls on every call of this
    function (derandomized, or from SIEVE_FUZZ_SEED), so both runs of the leak check send the same requests."""

    @settings(
        max_examples=examples,
        derandomize=not FUZZ_SEED,
        database=None,  # no .hypothesis directory; a failure prints the falsifying calls
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
        print_blob=True,
    )
    @given(calls=st.lists(mix(target.pools), min_size=BATCH, max_size=BATCH))
    def fuzz(calls: list[Call]) -> None:
        before = len(not_utf8.seen)
        outcomes = list(pool.map(lambda c: send(target.channel, c.rpc, c.messages), calls))
        problems = [f"a status message was not UTF-8: {m}" for m in not_utf8.seen[before:]]
        for call, outcome in zip(calls, outcomes, strict=True):
            tally.add(call, outcome)
            why = problem(call.rpc, outcome)
            if why is not None:
                problems.append(f"{call!r}\n  -> {why}")
        assert not problems, "\n".join(problems)

    if FUZZ_SEED:
        fuzz = seed(int(FUZZ_SEED))(fuzz)
    fuzz()


# ~90 s per 10,000 requests here, 2-3x that on a loaded machine; the setting's 300 s is too short for `make fuzz`.
@pytest.mark.timeout(120 + FUZZ_REQUESTS * 0.03)
def test_generated_requests(target: Target, not_utf8: NotUtf8Messages) -> None:
    examples = math.ceil(FUZZ_REQUESTS / 2 / BATCH)
    tally = Tally()
    pid = target.client.proc.pid
    started = time.monotonic()
    readings = [rss_mb(pid)]
    try:
        with ThreadPoolExecutor(BATCH, thread_name_prefix="fuzz") as pool:
            for _ in range(2):
                run_generated(target, examples, tally, pool, not_utf8)
                wait_jobs_idle(target)
                assert_serving(target)
                readings.append(rss_mb(pid))
    finally:
        elapsed = time.monotonic() - started
        how = f"SIEVE_FUZZ_SEED={FUZZ_SEED}" if FUZZ_SEED else "derandomized"
        print(f"\n{tally.report(f'generated requests ({how})')}")
        print(
            f"  took {elapsed:.1f} s ({tally.requests / max(elapsed, 1e-9):.0f} requests/s); server RSS MB: "
            f"start {readings[0]:.0f}, after warm-up run {readings[1] if len(readings) > 1 else math.nan:.0f}, "
            f"after second run {readings[2] if len(readings) > 2 else math.nan:.0f}"
        )
    assert tally.requests >= FUZZ_REQUESTS, f"sent {tally.requests} requests, meant {FUZZ_REQUESTS}"
    assert tally.by_code["OK"] >= tally.requests // 10, (
        "too few requests succeed: the mix no longer reaches deep"
    )
    growth = readings[2] - readings[1]
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.0f} MB over the second run: a leak?"
    assert_seeded_intact(target)
    assert_no_internal_job_errors(target)
    assert not unhandled_errors_in_log(target), unhandled_errors_in_log(target)[:5]


def test_raw_bytes(target: Target, not_utf8: NotUtf8Messages) -> None:
    # The streaming cases open with a valid message naming a scratch collection, so that the server reads
    # the bad one after it: bring back the ones the generated requests deleted.
    for name in SCRATCH:
        with contextlib.suppress(grpc.RpcError):
            target.client.collections.CreateCollection(
                collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name)),
                timeout=60,
            )
    tally = Tally()
    problems = []
    before = len(not_utf8.seen)
    started = time.monotonic()
    for rpc in all_rpcs():
        for label, messages in raw_corpus(rpc, target.pools, MAX_MESSAGE_BYTES, random.Random(rpc.path)):
            outcome = send(target.channel, rpc, messages)
            tally.add(Call(rpc, messages, "raw"), outcome)
            why = problem(rpc, outcome)
            if why is not None:
                problems.append(f"{rpc.name} <- {label}: {why}")
    print(f"\n{tally.report('raw payloads')}\n  took {time.monotonic() - started:.1f} s")
    problems += [f"a status message was not UTF-8: {m}" for m in not_utf8.seen[before:]]
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(problems[:40])
    assert_serving(target)
    assert_seeded_intact(target)
    assert not unhandled_errors_in_log(target), unhandled_errors_in_log(target)[:5]


def test_describe_shows_requests() -> None:
    """The failure report prints requests readably (a broken `describe` would hide what failed)."""
    rpc = next(r for r in all_rpcs() if r.name == "Search")
    payload = search_pb2.SearchRequest(collection="c", query="q\u200f").SerializeToString()
    assert describe(rpc, (payload,)) == 'collection: "c" query: "q\u200f"'
    assert "unparseable" in describe(rpc, (b"\xff",))


OFFLINE_POOLS = Pools(
    read_collections=READ,
    write_collections=SCRATCH,
    new_collections=NEW,
    doc_ids=("d0", "d1"),
    job_ids=("0123456789abcdee",),
    paths=("/tmp/x.jsonl",),
    words=WORDS,
    metadata={"kind": KINDS},
)


@pytest.mark.parametrize("rpc", all_rpcs(), ids=lambda rpc: rpc.name)
def test_generated_requests_that_are_not_hostile_decode(rpc: Rpc) -> None:
    """The strategies' own check (no server): a request not marked hostile is valid protobuf, however odd
    its values, so the mix reaches the servicers rather than stopping at the decoder."""
    message = message_factory.GetMessageClass(rpc.input)
    builder = Builder(hints_for(OFFLINE_POOLS, writes=False), hostile=False)

    @settings(max_examples=60, derandomize=True, database=None, deadline=None)
    @given(payload=builder.message(rpc.input))
    def decodes(payload: bytes) -> None:
        message.FromString(payload)

    decodes()


def test_wire_encoding_matches_protobuf() -> None:
    expected = search_pb2.SearchRequest(collection="c", top_k=-1, min_generation=2**63 - 1)
    ours = length_delimited(1, b"c") + tag(3, 0) + varint(-1) + tag(7, 0) + varint(2**63 - 1)
    assert ours == expected.SerializeToString()
