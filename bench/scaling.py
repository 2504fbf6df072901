"""Scaling and the physical floor: the real service under concurrency, and the index against corpus size.

    .venv/bin/python bench/scaling.py service BEIR_DIR [--quick] [--docs N] [--clients 1 4 16 64]
    .venv/bin/python bench/scaling.py corpus [--quick] [--sizes 10000 100000 1000000]

`service`: one real service, `sieve run` with a temporary data directory (its own Redis on a free port, a
Celery `embed` worker and a `colbert` worker, one pool process each, the server), all on this machine
with the client. The BEIR corpus (with --quick: every judged document plus the first documents up to
--docs, default 600) is indexed by an index job into a collection whose default enables late
interaction, so the embed worker returns every document's token vectors from the same encoder pass and
the server stores them with the documents (server/storage/store.py `tokens`). Then, all through gRPC Search:

  quality      every test query once per cascade (`retrieve`, `late`: retrieve 100 > MaxSim over
               all-MiniLM-L6-v2's token vectors), top 100 ids, scored with nDCG@10, recall@100, MRR@10 as
               `sieve eval` scores them (the same settings: sieve_cli.evaluate.cascade_settings)
  concurrency  for each cascade and 1, 4, 16, 64 clients (asyncio, one channel, in this process), as many
               distinct queries as max(base, 4 x clients) (quick: max(30, clients)), top_k 10 with documents: latency p50/p99 as the
               client sees it and throughput (completed / wall time). The query-vector, query-token and stage-score
               caches are flushed before every pass, so every request embeds its query and re-ranks
               (token vectors are stored with the documents: that is the steady state)
  floor        per query, alternating in one loop: Search `retrieve` (top 10) and its bare work in this
               process (ONNX query embedding + usearch search on the server's own index snapshot), then
               Search `late` (retrieve 100 > late interaction > top 10) and its bare work (embedding +
               search of 100 + the late-interaction stage's work: the candidates' blobs read from the
               server's own sieve.db, read-only, and maxsim_blobs). The difference is what the service
               adds: gRPC, protobuf, the asyncio server and its executor, the document store, Redis round
               trips (query cache), (de)serialisation.

The document vectors (from the server's index snapshot), the test query vectors and the retrieve run's
candidates are left in bench/.cache for bench/ann.py and bench/late_interaction_peers.py.

`corpus`: the server's own VectorIndex class, in this process, over synthetic 384-d vectors (bench/ann.py's
generator) at 10k, 100k and 1M (quick: 5k, 10k): search latency p50/p99 for the top 10 and the top 100
(what a re-ranking cascade asks), throughput with 1, 4, 16, 64 threads calling search, recall@10 against
exact search, bytes per vector. No model runs here: at these sizes embedding a corpus would take hours,
and a query's embedding costs the same at any corpus size (the service section measures it). A Search at
corpus size N costs about the service section's Search latency plus the difference of these index
latencies. The usearch index of a size is reused from bench/.cache/ann (built by bench/ann.py with the
same settings) when present, else built here (and its build time recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
from run import (
    CACHE,
    MODEL,
    ROOT,
    available_cores,
    command_line,
    log,
    percentiles,
    search_pass,
    write_result,
)
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from server.storage.index import VectorIndex, snapshot_files, snapshot_generation
from sieve_cli import stack
from sieve_cli.evaluate import EvalOptions, cascade_settings, describe_cascade
from sieve_cli.stack import free_port
from sieve_core.beir import BeirDataset, evaluate, load_beir
from sieve_core.config import load_settings

CLIENTS = (1, 4, 16, 64)
CASCADES = ("retrieve", "late")
COLLECTION = "bench"
RERANK_TIMEOUT_S = 30  # the sweep queues up to 64 re-ranks on one worker process: measure, do not degrade
REQUIRED = common_pb2.STAGE_MODE_REQUIRED
OFF = common_pb2.STAGE_MODE_OFF


# -- the service -----------------------------------------------------------------------------------------


def subset_ids(data: BeirDataset, total: int) -> list[str]:
    """Every judged document, then the first documents in corpus order, up to `total` (corpus order kept)."""
    judged = {d for rel in data.qrels.values() for d in rel if d in data.corpus}
    room = max(0, total - len(judged))
    chosen = set(judged)
    for doc in data.corpus:
        if room == 0:
            break
        if doc not in chosen:
            chosen.add(doc)
            room -= 1
    return [d for d in data.corpus if d in chosen]


def write_corpus(beir: Path, ids: set[str], out: Path) -> None:
    with (beir / "corpus.jsonl").open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for line in src:
            if line.strip() and str(json.loads(line)["_id"]) in ids:
                dst.write(line)


@contextlib.contextmanager
def service(data_dir: Path, redis_port: int, log_path: Path) -> Iterator[str]:
    """`sieve run` (Redis, embed and colbert workers, server) on free ports (sieve_cli.stack); stopped on exit."""
    settings = {
        "SIEVE_LOCAL_REDIS_PORT": str(redis_port),
        "SIEVE_RUN_WORKER_QUEUES": "embed,colbert",
        "SIEVE_RERANK_TIMEOUT_S": str(RERANK_TIMEOUT_S),
        "SIEVE_SNAPSHOT_INTERVAL_S": "2",  # a snapshot soon after the job, for the bare-work baseline
        "SIEVE_LOG_LEVEL": "WARNING",
    }
    with stack.sieve_process(
        "run", data_dir=data_dir, settings=settings, log=log_path, timeout_s=180
    ) as served:
        yield served.address


def index_corpus(channel: grpc.Channel, source: Path, documents: int) -> jobs_pb2.Job:
    collections = collections_pb2_grpc.CollectionServiceStub(channel)
    defaults = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
    collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(name=COLLECTION, defaults=defaults)
        ),
        timeout=60,
    )
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job = jobs.StartIndexJob(
        jobs_pb2.StartIndexJobRequest(
            collection=COLLECTION, path=str(source.resolve()), format=jobs_pb2.SOURCE_FORMAT_BEIR
        ),
        timeout=60,
    ).job
    last_tenth = -1
    for message in jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job.id, min_interval_ms=2000), timeout=6 * 3600):
        job = message.job
        tenth = int(10 * job.done / max(documents, 1))
        if tenth != last_tenth:
            last_tenth = tenth
            log(f"  index job: {job.done}/{documents} documents, {job.docs_per_second:.1f} docs/s")
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED or job.failed:
        raise SystemExit(
            f"index job ended {jobs_pb2.JobState.Name(job.state)} ({job.failed} bad lines): {job.reason}"
        )
    return job


def flush_caches(client: redis.Redis) -> int:
    """Delete cached query vectors, query token rows and stage scores (documents' token vectors live in
    the server's store, not in Redis). Without sieve:qtok a late-interaction Search would take its query's
    vector and token rows from the cache and skip the encoder pass its bare twin pays for."""
    n = 0
    for pattern in ("sieve:qvec:*", "sieve:qtok:*", "sieve:scores:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            n += int(client.delete(*keys[start : start + 500]))
    return n


def stage_name(stage: int) -> str:
    return common_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()


def quality(
    search: Any, data: BeirDataset, generation: int
) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    opts = EvalOptions(folder=Path("."))
    runs: list[dict[str, Any]] = []
    retrieved: dict[str, list[str]] = {}
    for spec in CASCADES:
        settings = cascade_settings(spec, opts)
        run: dict[str, list[str]] = {}
        stage_ms: dict[str, list[float]] = {}
        methods: dict[str, int] = {}
        started = time.perf_counter()
        for qid, text in data.queries.items():
            request = search_pb2.SearchRequest(
                collection=COLLECTION,
                query=text,
                top_k=opts.top_k,
                omit_documents=True,
                settings=settings,
                min_generation=generation,
            )
            response = search.Search(request, timeout=120)
            run[qid] = [hit.id for hit in response.hits]
            for report in response.stages:
                if report.status == search_pb2.STAGE_STATUS_COMPLETED:
                    stage_ms.setdefault(stage_name(report.stage), []).append(report.took_ms)
                    if report.stage == common_pb2.STAGE_LATE_INTERACTION:
                        methods[report.method] = methods.get(report.method, 0) + 1
        seconds = time.perf_counter() - started
        metrics = evaluate(run, data.qrels)
        log(
            f"  {spec:9s} nDCG@10 {metrics['ndcg@10']:.4f}  recall@100 {metrics['recall@100']:.4f}  "
            f"MRR@10 {metrics['mrr@10']:.4f}  ({len(run) / seconds:.1f} q/s; stage p50 ms "
            + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stage_ms.items())
            + (f"; {max(methods, key=methods.__getitem__)!r}" if methods else "")
            + ")"
        )
        runs.append(
            {
                "spec": spec,
                "cascade": describe_cascade(spec, opts),
                **metrics,
                "search_queries_per_s": len(run) / seconds,
                "stage_ms_p50": {k: statistics.median(v) for k, v in stage_ms.items()},
                "late_interaction_methods": dict(sorted(methods.items(), key=lambda kv: -kv[1])[:5]),
            }
        )
        if spec == "retrieve":
            retrieved = run
    return runs, retrieved


def sweep_settings(spec: str) -> common_pb2.SearchSettings:
    if spec == "late":
        return common_pb2.SearchSettings(
            retrieve_candidates=100, late_interaction=REQUIRED, late_interaction_keep=10, cross_encoder=OFF
        )
    return common_pb2.SearchSettings(late_interaction=OFF, cross_encoder=OFF)


async def _pass(address: str, queries: list[str], clients: int, spec: str) -> dict[str, Any]:
    settings = sweep_settings(spec)
    requests = [
        search_pb2.SearchRequest(collection=COLLECTION, query=text, top_k=10, settings=settings)
        for text in queries
    ]
    options = [("grpc.max_receive_message_length", 64 << 20)]
    done = await search_pass(address, requests, clients, options)
    latencies = done["latency_ms"]
    return {
        "clients": clients,
        "requests": len(queries),
        "completed": len(latencies),
        "errors": done["errors"],
        "degraded": done["degraded"],
        "throughput_qps": len(latencies) / done["wall_s"],
        **percentiles(latencies),
        "wall_s": round(done["wall_s"], 2),
        "client_cpu_s": round(done["client_cpu_s"], 2),
    }


def concurrency(
    address: str, cache: redis.Redis, pool: list[str], base: int, per_client: int, clients: tuple[int, ...]
) -> list[dict[str, Any]]:
    out = []
    for spec in CASCADES:
        asyncio.run(_pass(address, pool[:8], 4, spec))  # warm-up: connections, executor threads, worker
        for c in clients:
            count = min(len(pool), max(base, per_client * c))
            flush_caches(cache)
            # A different slice per pass: each request's query is new to the server in its pass.
            offset = (c * 97) % max(1, len(pool) - count + 1)
            r = asyncio.run(_pass(address, pool[offset : offset + count], c, spec))
            r["cascade"] = spec
            log(
                f"  {spec:9s} {c:3d} clients: p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                f"{r['throughput_qps']:6.1f} q/s  errors {r['errors']}  degraded {r['degraded']}"
            )
            out.append(r)
    return out


def touch(channel: grpc.Channel, data: BeirDataset) -> int:
    """A write that changes nothing (one document upserted with its own text) after the snapshot interval:
    the server snapshots on a write once SIEVE_SNAPSHOT_INTERVAL_S has passed, so the snapshot then holds
    every document, for the bare-work baseline."""
    time.sleep(2.5)
    doc = next(iter(data.corpus))
    response = documents_pb2_grpc.DocumentServiceStub(channel).UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=COLLECTION, documents=[documents_pb2.Document(id=doc, text=data.corpus[doc])]
        ),
        timeout=120,
    )
    return int(response.generation)


def load_snapshot(data_dir: Path, generation: int, ef_search: int) -> tuple[VectorIndex, Path]:
    deadline = time.monotonic() + 120
    while True:
        found = [
            p
            for p in (data_dir / "collections").rglob("index-*.usearch")
            if snapshot_generation(p) >= generation
        ]
        if found:
            directory = found[0].parent
            loaded = VectorIndex.load_latest(directory, 384, "cosine", ef_search=ef_search)
            if loaded is not None:
                return loaded[0], snapshot_files(directory)[-1]
        if time.monotonic() > deadline:
            raise SystemExit(f"no index snapshot of generation {generation} within 120 s")
        time.sleep(0.5)


def server_tokens(data_dir: Path) -> tuple[sqlite3.Connection, int, Any]:
    """A read-only connection to the server's store (WAL: readers never block its writer), the
    collection's id and its token format, so the bare late-interaction work reads the very blobs the
    server's stage reads."""
    from sieve_core.token_format import TokenFormat

    conn = sqlite3.connect(f"file:{data_dir / 'sieve.db'}?mode=ro", uri=True, check_same_thread=False)
    cid, fmt = conn.execute(
        "SELECT id, token_format FROM collections WHERE name = ?", (COLLECTION,)
    ).fetchone()
    return conn, int(cid), TokenFormat.from_json(json.loads(fmt))


# The floor section's timings, each recorded per query (its p50 goes to the result and the report).
FLOOR_TIMINGS = (
    "retrieve_client",
    "retrieve_server",
    "retrieve_stage",
    "retrieve_bare",
    "retrieve_bare_embed",
    "late_client",
    "late_server",
    "late_stage_retrieve",
    "late_stage_late",
    "late_bare",
    "late_bare_retrieve100",
    "late_bare_stage",
)


def floor(
    address: str,
    cache_client: redis.Redis,
    data: BeirDataset,
    index: VectorIndex,
    data_dir: Path,
    qids: list[str],
) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from sieve_core.late_interaction import maxsim_blobs
    from sieve_core.models.bi_encoder import BiEncoderRunner
    from sieve_core.token_format import prepare_query

    runner = BiEncoderRunner(ROOT / "models" / MODEL)  # the server's threads: one per core
    runner.warmup()
    conn, cid, fmt = server_tokens(data_dir)
    # numpy's BLAS on one thread, as in the server's executor threads (server/core/executors.py)
    blas = threadpool_limits(limits=1, user_api="blas")
    t: dict[str, list[float]] = {k: [] for k in FLOOR_TIMINGS}
    pending = 0
    with contextlib.closing(conn), grpc.insecure_channel(address) as channel:
        search = search_pb2_grpc.SearchServiceStub(channel)

        def grpc_search(text: str, spec: str) -> search_pb2.SearchResponse:
            flush_caches(cache_client)  # outside the timed span
            request = search_pb2.SearchRequest(
                collection=COLLECTION, query=text, top_k=10, settings=sweep_settings(spec)
            )
            t0 = time.perf_counter()
            response = search.Search(request, timeout=120)
            t[f"{spec}_client"].append((time.perf_counter() - t0) * 1000)
            t[f"{spec}_server"].append(response.took_ms)
            return response

        for qid in qids[:5]:  # warm-up, discarded
            grpc_search(data.queries[qid], "late")
        for qid in qids:
            text = data.queries[qid]
            response = grpc_search(text, "retrieve")
            t["retrieve_stage"].append(response.stages[0].took_ms)
            t0 = time.perf_counter()
            vector = runner.embed([text])[0]
            t1 = time.perf_counter()
            index.search(vector, 10)
            t2 = time.perf_counter()
            t["retrieve_bare"].append((t2 - t0) * 1000)
            t["retrieve_bare_embed"].append((t1 - t0) * 1000)

            response = grpc_search(text, "late")
            for report in response.stages:
                if report.stage == common_pb2.STAGE_RETRIEVE:
                    t["late_stage_retrieve"].append(report.took_ms)
                elif report.stage == common_pb2.STAGE_LATE_INTERACTION:
                    t["late_stage_late"].append(report.took_ms)
            t0 = time.perf_counter()
            # zero-shot, as the server: one encoder pass gives the query vector and its token rows
            vectors, rows = runner.encode([text], 32, tokens=True)
            assert rows is not None
            keys, _ = index.search(vectors[0], 100)
            t1 = time.perf_counter()
            # the stage (server/core/tokens.py TokenStage._maxsim): blobs by key, MaxSim from them
            wanted = [int(k) for k in keys]
            marks = ",".join("?" * len(wanted))
            blobs = dict(
                conn.execute(
                    f"SELECT key, blob FROM tokens WHERE collection_id = ? AND key IN ({marks})",
                    (cid, *wanted),
                ).fetchall()
            )
            found = [blobs[k] for k in wanted if k in blobs]
            maxsim_blobs(prepare_query(rows[0], fmt), found)
            t2 = time.perf_counter()
            pending += len(wanted) - len(found)
            t["late_bare_retrieve100"].append((t1 - t0) * 1000)
            t["late_bare_stage"].append((t2 - t1) * 1000)
            t["late_bare"].append((t2 - t0) * 1000)
    blas.restore_original_limits()
    p50 = {k: statistics.median(v) for k, v in t.items()}
    return {
        "queries": len(qids),
        "p50_ms": {k: round(v, 3) for k, v in p50.items()},
        "p99_ms": {k: round(float(np.percentile(v, 99)), 3) for k, v in t.items()},
        "bare_late_interaction_pending": pending,
        "overhead_share_p50": {
            "retrieve_request": round(1 - p50["retrieve_bare"] / p50["retrieve_client"], 3),
            "retrieve_stage_in_server": round(1 - p50["retrieve_bare"] / p50["retrieve_stage"], 3),
            "late_request": round(1 - p50["late_bare"] / p50["late_client"], 3),
            "late_interaction_stage": round(1 - p50["late_bare_stage"] / p50["late_stage_late"], 3),
        },
        "definitions": {
            "retrieve_client": "gRPC Search, retrieve only, top 10 with documents, as the client times it",
            "retrieve_server": "the response's took_ms (inside the server)",
            "retrieve_stage": "the retrieve stage's took_ms (embedding + index search)",
            "retrieve_bare": "in this process: ONNX query embedding + usearch search (top 10) on the snapshot",
            "late_client": "gRPC Search, retrieve 100 > late interaction (REQUIRED) > top 10 with documents",
            "late_stage_late": "the late-interaction stage's took_ms (in the server: blobs from its store, "
            "MaxSim in its executor)",
            "late_bare": "in this process: one encoder pass (query vector + token rows) + search (top 100) + "
            "the stage's work: the 100 blobs read by key from the server's own sieve.db (read-only) and "
            "prepare_query + maxsim_blobs, as server/core/tokens.py does",
        },
    }


def run_service(args: argparse.Namespace) -> int:
    started = time.monotonic()
    beir: Path = args.beir
    if not (beir / "corpus.jsonl").is_file():
        print(f"skipped: {beir} is not a BEIR folder", file=sys.stderr)
        return 0
    if shutil.which("redis-server") is None:
        print("error: redis-server is not installed (make redis installs it)", file=sys.stderr)
        return 1
    data = load_beir(beir)
    total_docs = args.docs or (600 if args.quick else 0)
    base = args.requests or (30 if args.quick else 300)
    n_floor = args.floor_queries or (20 if args.quick else 200)
    n_quality = args.quality_queries or (100 if args.quick else 0)
    argv = ["service", str(beir)] + (["--quick"] if args.quick else [])
    for flag, value in (
        ("--docs", args.docs),
        ("--requests", args.requests),
        ("--floor-queries", args.floor_queries),
        ("--quality-queries", args.quality_queries),
    ):
        if value:
            argv += [flag, str(value)]
    if args.clients != list(CLIENTS):
        argv += ["--clients", *map(str, args.clients)]
    command = command_line("bench/scaling.py", argv)

    with tempfile.TemporaryDirectory(prefix="sieve-bench-service-") as tmp:
        tmp_dir = Path(tmp)
        if total_docs and total_docs < len(data.corpus):
            ids = subset_ids(data, total_docs)
            source = tmp_dir / "corpus.jsonl"
            write_corpus(beir, set(ids), source)
            data = BeirDataset(data.name, {d: data.corpus[d] for d in ids}, data.queries, data.qrels)
            corpus_note = (
                f"subset: every judged document + the first documents in corpus order, {len(ids)} of "
                f"{sum(1 for _ in (beir / 'corpus.jsonl').open())} documents (not comparable with published figures)"
            )
        else:
            source = beir / "corpus.jsonl"
            corpus_note = f"the whole corpus, {len(data.corpus)} documents"
        # Queries for the concurrency passes: every query of the set (test and train), in a fixed order.
        pool = [
            json.loads(line)["text"]
            for line in (beir / "queries.jsonl").open(encoding="utf-8")
            if line.strip()
        ]
        random.Random(0).shuffle(pool)
        redis_port = free_port()
        shared = {
            "dataset": data.name,
            "corpus": corpus_note,
            "documents": len(data.corpus),
            "queries": len(data.queries),
            "service": "sieve run: server + Redis + embed and colbert Celery workers (1 process each), this machine",
        }

        def record(name: str, payload: dict[str, Any]) -> None:
            # Each part is written as soon as it is measured: a run stopped for time keeps what it has.
            write_result(name, {**shared, **payload}, command=command, quick=args.quick, started=started)

        log(f"starting `sieve run` ({corpus_note})")
        with service(tmp_dir / "data", redis_port, tmp_dir / "service.log") as address:
            cache = redis.Redis(port=redis_port, socket_timeout=30)
            with grpc.insecure_channel(address) as channel:
                t0 = time.perf_counter()
                job = index_corpus(channel, source, len(data.corpus))
                index_s = time.perf_counter() - t0
                log(f"indexed {job.done} documents in {index_s:.0f} s; quality through Search")
                search = search_pb2_grpc.SearchServiceStub(channel)
                judged = data
                if n_quality and n_quality < len(data.queries):
                    keep = set(random.Random(0).sample(sorted(data.queries), n_quality))
                    judged = BeirDataset(
                        data.name,
                        data.corpus,
                        {q: t for q, t in data.queries.items() if q in keep},
                        {q: r for q, r in data.qrels.items() if q in keep},
                    )
                runs, retrieved = quality(search, judged, job.generation)
                record(
                    f"quality-{data.name}",
                    {
                        "benchmark": "quality",
                        "model": MODEL,
                        "index_job_docs_per_s": job.done / index_s,
                        "index_note": "index job (embed worker), token vectors from the same encoder pass, stored with the documents",
                        "runs": runs,
                        "quality_queries": len(judged.queries),
                    },
                )
                generation = touch(channel, data)
            settings = load_settings({})
            index, snapshot = load_snapshot(tmp_dir / "data", generation, settings.default_ef_search)
            save_vectors(beir.name, snapshot, data, retrieved, corpus_note)
            log(f"floor: {n_floor} queries, Search vs bare in-process work, alternating")
            qids = random.Random(1).sample(sorted(retrieved), min(n_floor, len(retrieved)))
            floor_result = floor(address, cache, data, index, tmp_dir / "data", qids)
            f = floor_result["p50_ms"]
            log(
                f"  retrieve: Search {f['retrieve_client']:.2f} ms vs bare {f['retrieve_bare']:.2f} ms; "
                f"late: Search {f['late_client']:.2f} ms vs bare {f['late_bare']:.2f} ms "
                f"(stage {f['late_stage_late']:.2f} vs {f['late_bare_stage']:.2f} ms)"
            )
            record("floor", {"benchmark": "floor", **floor_result})
            log(f"concurrency: clients {args.clients}, cascades {CASCADES}")
            sweep = concurrency(address, cache, pool, base, 1 if args.quick else 4, tuple(args.clients))
            record(
                "concurrency",
                {
                    "benchmark": "concurrency",
                    "request": "top_k 10 with documents; late: retrieve 100 > late interaction (REQUIRED) keep 10",
                    "caches": "query vectors and stage scores flushed before every pass; token vectors warm",
                    "client": "asyncio gRPC client in one process on the same 2 cores as the service",
                    "rerank_timeout_s": RERANK_TIMEOUT_S,
                    "passes": sweep,
                },
            )
            cache.close()
    return 0


def save_vectors(
    name: str, snapshot: Path, data: BeirDataset, retrieved: dict[str, list[str]], note: str
) -> None:
    """Document vectors from the server's own snapshot, test query vectors, and the retrieve run's top 100."""
    from usearch.index import Index

    from sieve_core.models.bi_encoder import BiEncoderRunner

    index = Index.restore(str(snapshot))
    keys = np.asarray(index.keys, dtype=np.uint64)
    documents = np.asarray(index.get(keys, dtype="f32"), dtype=np.float32).reshape(len(keys), -1)
    # As the snapshot stores them (i8: scaled to the int8 range, rounded): L2-normalised again for inner product.
    documents /= np.maximum(np.linalg.norm(documents, axis=1, keepdims=True), 1e-12)
    runner = BiEncoderRunner(ROOT / "models" / MODEL)
    queries = runner.embed(list(data.queries.values()))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE / f"embeddings-{name}.npz", documents=documents, queries=queries, note=np.array(note))
    (CACHE / f"candidates-{name}.json").write_text(json.dumps({"note": note, "candidates": retrieved}))


# -- corpus size -----------------------------------------------------------------------------------------


def _threaded(vindex: VectorIndex, queries: np.ndarray, threads: int) -> dict[str, Any]:
    """`threads` threads calling search (top 10) on a shared list of at least 4 x threads queries."""
    per_call: list[float] = []

    def one(q: np.ndarray) -> None:
        t0 = time.perf_counter()
        vindex.search(q, 10)
        per_call.append((time.perf_counter() - t0) * 1000)

    reps = max(1, (4 * threads) // len(queries) + 1)
    work = [q for _ in range(reps) for q in queries]
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(one, work))
        wall = time.perf_counter() - t0
    return {"threads": threads, "qps": len(work) / wall, **percentiles(per_call)}


def run_corpus(args: argparse.Namespace) -> int:
    from ann import build_usearch, exact_topk, recall, synthetic, synthetic_queries, usearch_cache_path
    from usearch.index import Index, MetricKind

    started = time.monotonic()
    sizes = args.sizes or ([5_000, 10_000] if args.quick else [10_000, 100_000, 1_000_000])
    n_queries = args.queries or (300 if args.quick else 1000)
    settings = load_settings({})
    threads = available_cores()
    results: list[dict[str, Any]] = []

    def save() -> None:  # after every size: a run stopped for time keeps what it has measured
        argv = ["corpus"] + (["--quick"] if args.quick else [])
        if args.sizes:
            argv += ["--sizes", *map(str, args.sizes)]
        write_result(
            "scaling-corpus",
            {
                "benchmark": "scaling-corpus",
                "what": "server.index.VectorIndex in-process (usearch cos, the server's settings), synthetic 384-d "
                "vectors (bench/ann.py generator); no embedding, no gRPC",
                "settings": {
                    "connectivity": settings.hnsw_connectivity,
                    "ef_construction": settings.hnsw_ef_construction,
                    "ef_search": settings.default_ef_search,
                    "cores": threads,
                },
                "queries": n_queries,
                "sizes": results,
            },
            command=command_line("bench/scaling.py", argv),
            quick=args.quick,
            started=started,
        )

    for n in sizes:
        path = usearch_cache_path(n)
        corpus = None
        build_s = None
        if path.is_file():
            log(f"{n:,} vectors: index from {path}")
            # A usearch cos f32 index (bench/ann.py's): queries are normalised floats, as VectorIndex's f32 layout
            # prepares them (its default, i8, would quantise them).
            vindex = VectorIndex(
                384,
                "cosine",
                ef_search=settings.default_ef_search,
                storage="f32",
                index=Index.restore(str(path)),
            )
        else:
            log(f"{n:,} vectors: building the index here (bench/ann.py did not leave one)")
            corpus = synthetic(n)
            built, build_s = build_usearch(corpus, MetricKind.Cos, threads)  # VectorIndex's own settings
            path.parent.mkdir(parents=True, exist_ok=True)
            built.save(str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").replace(path)
            vindex = VectorIndex(
                384, "cosine", ef_search=settings.default_ef_search, storage="f32", index=built
            )
        queries = synthetic_queries(n, n_queries)
        if corpus is None:
            corpus = synthetic(n)
        truth = exact_topk(corpus, queries)
        del corpus
        for q in queries[:20]:
            vindex.search(q, 10)
        entry: dict[str, Any] = {
            "vectors": n,
            "build_s": build_s,
            "index_file_bytes_per_vector": path.stat().st_size / n,
        }
        found = []
        for k in (10, 100):
            ms = []
            for q in queries:
                t0 = time.perf_counter()
                keys, _ = vindex.search(q, k)
                ms.append((time.perf_counter() - t0) * 1000)
                if k == 10:
                    found.append(keys.astype(np.int64))
            entry[f"top{k}"] = percentiles(ms)
        entry["recall@10"] = recall(np.stack(found), truth)
        entry["threads"] = [_threaded(vindex, queries, c) for c in args.clients]
        log(
            f"  {n:>9,}: top10 p50 {entry['top10']['p50_ms']:.3f} ms p99 {entry['top10']['p99_ms']:.3f} ms, "
            f"top100 p50 {entry['top100']['p50_ms']:.3f} ms, recall@10 {entry['recall@10']:.4f}, "
            f"QPS " + ", ".join(f"{t['threads']}t {t['qps']:.0f}" for t in entry["threads"])
        )
        results.append(entry)
        del vindex
        save()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("service", help="the real service: quality, concurrency, floor")
    s.add_argument("beir", type=Path)
    s.add_argument("--quick", action="store_true")
    s.add_argument("--docs", type=int, help="index a subset of this many documents (quick: 600)")
    s.add_argument(
        "--requests",
        type=int,
        help="requests per pass, at least 4 x clients (default 300; quick 30, at least 1 per client)",
    )
    s.add_argument(
        "--floor-queries", type=int, help="queries of the floor comparison (default 200, quick 20)"
    )
    s.add_argument(
        "--quality-queries", type=int, help="test queries scored per cascade (default all, quick 100)"
    )
    s.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    c = sub.add_parser("corpus", help="VectorIndex vs corpus size (synthetic vectors)")
    c.add_argument("--quick", action="store_true")
    c.add_argument("--sizes", type=int, nargs="+")
    c.add_argument("--queries", type=int)
    c.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the service we started
    return run_service(args) if args.what == "service" else run_corpus(args)


if __name__ == "__main__":
    sys.exit(main())
