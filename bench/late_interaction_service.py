"""Issue 13's acceptance benchmarks: late interaction against retrieval alone, on the real service.

    .venv/bin/python bench/late_interaction_service.py [../shared/datasets/scifact] [--limit-docs N]
        [--clients 16] [--rounds 3] [--flush-queries 10]          (or: make bench-li)

One `sieve run` with its defaults (its own Redis on a free port, the workers it starts, the server; only the
ports, the data directory and a 60 s re-rank timeout are set, so that a stage that has to recompute is
measured rather than cut off), and this client, on the same machine. Everything compared is interleaved,
so that machine noise (five engineers share 2 cores here) hits both sides alike; the load average is
recorded around every section.

  indexing     two collections, one whose defaults enable late interaction (BEST_EFFORT: it stores token
               vectors in the collection's default format) and a plain one; the corpus goes into both
               through UpsertDocuments in batches of 64, in blocks of 4 batches alternating late / plain.
               Work a late-interaction write leaves behind (token vectors computed after the
               acknowledgement: a Celery queue not yet drained, or documents the collection reports as
               pending) is waited for at the end of the late block and counted against it, so it neither
               hides nor slows the plain block. Target: docs/s late >= 0.9 x plain.
  single       one client, every test query, `retrieve` and `late` (the same settings as `sieve eval
               --cascade retrieve --cascade late`: retrieve 100, late interaction REQUIRED, top 100 ids)
               alternating per query, the order swapped every other query; the query-vector and
               stage-score caches are emptied before every Search, so each one embeds its query and
               re-ranks (token vectors stay: the warm state). Client latency p50/p99, the stages' took_ms
               p50s, nDCG@10 of both runs. Targets: late-interaction stage p50 <= 1.5 x the retrieve
               stage p50 (of the retrieve-only searches), searches/s late >= 0.5 x retrieve-only.
  concurrency  16 clients (asyncio, in this process), rounds alternating retrieve / late, every pass of
               distinct queries (all of the data set's queries), caches emptied before each pass.
               Target: throughput late >= 0.5 x retrieve-only.
  flush        for a few test queries: warm late searches (tokens warm, query caches emptied: the
               median of 3), then Redis FLUSHALL, then the same search once. Target: the first search
               after the flush <= 2 x a warm one (client latency; the stage's took_ms is recorded too).
  method       the late-interaction stage's method text (and, where the server reports them, where the
               token vectors came from and how many bytes were read).

Writes bench/results/late_interaction_service.json (with --limit-docs: bench/results/quick/). A missed
target prints its figure and MISSED; the targets are the issue's, never adjusted here.

--server-blas-threads N sets OPENBLAS_NUM_THREADS for the service's processes (an experiment: `sieve run`
gives its workers one BLAS thread, the server OpenBLAS's default of one per core). On branch li, 300
documents, 40 queries, load average ~11, A-B-A: default / 1 thread / default: late-interaction stage p50
82.6 / 5.3 / 20.4 ms against retrieve 29.8 / 10.5 / 12.4 ms; concurrency 16 late/retrieve 0.19 / 0.55 / 0.23.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
from run import DEFAULT_BEIR, command_line, log, percentiles, search_pass, write_result
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from sieve_cli import stack
from sieve_cli.evaluate import EvalOptions, cascade_settings
from sieve_cli.stack import free_port
from sieve_core.beir import BeirDataset, evaluate, load_beir

LATE, PLAIN = "li-bench-late", "li-bench-plain"
BATCH = 64
RERANK_TIMEOUT_S = 60
TARGETS = {  # name: (comparison, bound): the measured acceptance
    "li_stage_p50_over_retrieve_stage_p50": ("<=", 1.5),
    "searches_per_s_late_over_retrieve": (">=", 0.5),
    "concurrency_throughput_late_over_retrieve": (">=", 0.5),
    "indexing_docs_per_s_late_over_plain": (">=", 0.9),
    "first_after_flush_over_warm": ("<=", 2.0),
}
EVAL = EvalOptions(folder=Path("."))  # sieve eval's defaults: top 100, retrieve 100, late keeps 100
SETTINGS = {spec: cascade_settings(spec, EVAL) for spec in ("retrieve", "late")}
QUERY_CACHES = ("sieve:qvec:*", "sieve:scores:*", "sieve:pair:*")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextlib.contextmanager
def sieve_run(
    data_dir: Path, redis_port: int, log_path: Path, blas_threads: int | None = None
) -> Iterator[str]:
    """`sieve run` with its defaults on free ports (sieve_cli.stack); stopped (server, workers, Redis) on exit.
    `blas_threads`: OPENBLAS_NUM_THREADS for every process it starts (an experiment; default: inherited)."""
    settings = {
        "SIEVE_LOCAL_REDIS_PORT": str(redis_port),
        "SIEVE_RERANK_TIMEOUT_S": str(RERANK_TIMEOUT_S),
        "SIEVE_LOG_LEVEL": "WARNING",
    }
    if blas_threads is not None:
        settings["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    with stack.sieve_process(
        "run", data_dir=data_dir, settings=settings, log=log_path, timeout_s=180
    ) as served:
        yield served.address


def empty_query_caches(cache: redis.Redis) -> None:
    """Deletes cached query vectors and stage scores (token vectors, wherever they live, stay)."""
    for pattern in QUERY_CACHES:
        keys = list(cache.scan_iter(match=pattern, count=2000))
        if keys:
            cache.delete(*keys)


# -- stage reports ---------------------------------------------------------------------------------------


def stage_name(stage: int) -> str:
    return common_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()


_EXTRA_FIELDS = ("token_source", "token_bytes", "tokens_pending", "query_token_source")


def late_report(response: search_pb2.SearchResponse) -> dict[str, Any] | None:
    """The late-interaction stage's report as a dict, with the token fields when this server has them."""
    fields = search_pb2.StageReport.DESCRIPTOR.fields_by_name
    for r in response.stages:
        if r.stage == common_pb2.STAGE_LATE_INTERACTION:
            out = {
                "status": search_pb2.StageStatus.Name(r.status),
                "took_ms": r.took_ms,
                "method": r.method,
                "reason": r.reason,
            }
            out.update({f: getattr(r, f) for f in _EXTRA_FIELDS if f in fields})
            return out
    return None


def stage_ms(response: search_pb2.SearchResponse) -> dict[str, float]:
    return {
        stage_name(r.stage): r.took_ms
        for r in response.stages
        if r.status == search_pb2.STAGE_STATUS_COMPLETED
    }


# -- sections --------------------------------------------------------------------------------------------


def create_collections(channel: grpc.Channel) -> None:
    collections = collections_pb2_grpc.CollectionServiceStub(channel)
    late = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
    for name, defaults in ((LATE, late), (PLAIN, None)):
        collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name=name, defaults=defaults)
            ),
            timeout=60,
        )


def token_storage(channel: grpc.Channel) -> dict[str, Any] | None:
    """The late collection's token storage (format, pending) if this server reports one."""
    if "token_storage" not in collections_pb2.Collection.DESCRIPTOR.fields_by_name:
        return None
    col = collections_pb2_grpc.CollectionServiceStub(channel).GetCollection(
        collections_pb2.GetCollectionRequest(name=LATE), timeout=30
    )
    ts = col.collection.token_storage
    return {
        "pool_factor": ts.pool_factor,
        "projection_dims": ts.projection_dims,
        "description": ts.description,
        "model_id": ts.model_id,
        "pending": ts.pending,
    }


def background_left(channel: grpc.Channel, cache: redis.Redis, texts: int) -> str | None:
    """What a late-interaction write still owes, or None when nothing: queued token tasks (the Celery
    `embed` queue), token vectors cached by a worker but fewer than the texts written (the pre-store
    design), or documents the collection reports as pending."""
    queued = int(cache.llen("embed"))
    if queued:
        return f"{queued} queued embed tasks"
    storage = token_storage(channel)
    if storage is not None and storage["pending"]:
        return f"{storage['pending']} documents pending"
    if storage is None or not storage.get("description"):  # tokens cached in Redis by the worker
        cached = sum(1 for _ in cache.scan_iter(match="sieve:tok:*", count=2000))
        if cached < texts:
            return f"{cached}/{texts} token vectors cached"
    return None


def wait_background(channel: grpc.Channel, cache: redis.Redis, texts: int) -> float:
    """Seconds until a late-interaction write's leftover work is done (see `background_left`)."""
    t = time.perf_counter()
    while (left := background_left(channel, cache, texts)) is not None:
        if time.perf_counter() - t > 3600:
            raise SystemExit(f"late-interaction writes still unfinished after an hour: {left}")
        time.sleep(0.2)
    return time.perf_counter() - t


def indexing(channel: grpc.Channel, cache: redis.Redis, data: BeirDataset, block: int) -> dict[str, Any]:
    """Blocks of `block` batches, late and plain alternating (the order swapped every block). A late block's
    time includes waiting for its background work, and every block starts with none left over, so that
    the worker's token pass for late documents is not paid by the plain block that follows."""
    documents = documents_pb2_grpc.DocumentServiceStub(channel)
    ids = list(data.corpus)
    seconds = {LATE: 0.0, PLAIN: 0.0}
    acknowledged = {LATE: 0.0, PLAIN: 0.0}
    drained = 0.0
    seen: set[str] = set()
    before = loadavg()
    step = BATCH * block
    for k, start in enumerate(range(0, len(ids), step)):
        chunk = ids[start : start + step]
        seen.update(data.corpus[d] for d in chunk)
        for name in (LATE, PLAIN) if k % 2 == 0 else (PLAIN, LATE):
            t = time.perf_counter()
            for j in range(0, len(chunk), BATCH):
                batch = [documents_pb2.Document(id=d, text=data.corpus[d]) for d in chunk[j : j + BATCH]]
                documents.UpsertDocuments(
                    documents_pb2.UpsertDocumentsRequest(collection=name, documents=batch), timeout=600
                )
            acknowledged[name] += time.perf_counter() - t
            left = wait_background(channel, cache, len(seen)) if name == LATE else 0.0
            drained += left
            seconds[name] += time.perf_counter() - t
        log(f"  indexing: {start + len(chunk)}/{len(ids)} documents into each collection")
    rates = {name: len(ids) / s for name, s in seconds.items()}
    return {
        "documents": len(ids),
        "batch": BATCH,
        "block_batches": block,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "late_background_s": round(drained, 2),
        "docs_per_s": {k: round(v, 2) for k, v in rates.items()},
        "docs_per_s_acknowledged": {k: round(len(ids) / v, 2) for k, v in acknowledged.items()},
        "ratio": rates[LATE] / rates[PLAIN],
        "token_storage": token_storage(channel),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }


@dataclass
class Tally:
    latency_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    run: dict[str, list[str]] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    not_completed: int = 0


def single_client(channel: grpc.Channel, cache: redis.Redis, data: BeirDataset) -> dict[str, Any]:
    search = search_pb2_grpc.SearchServiceStub(channel)
    tallies = {spec: Tally() for spec in SETTINGS}
    before = loadavg()
    for i, (qid, text) in enumerate(data.queries.items()):
        for spec in ("retrieve", "late") if i % 2 == 0 else ("late", "retrieve"):
            empty_query_caches(cache)
            request = search_pb2.SearchRequest(
                collection=LATE, query=text, top_k=EVAL.top_k, omit_documents=True, settings=SETTINGS[spec]
            )
            t = time.perf_counter()
            response = search.Search(request, timeout=120)
            tally = tallies[spec]
            tally.latency_ms.append((time.perf_counter() - t) * 1000)
            tally.run[qid] = [hit.id for hit in response.hits]
            for name, ms in stage_ms(response).items():
                tally.stages.setdefault(name, []).append(ms)
            report = late_report(response)
            if spec == "late" and report is not None:
                tally.methods[report["method"]] = tally.methods.get(report["method"], 0) + 1
                tally.not_completed += report["status"] != "STAGE_STATUS_COMPLETED"
                if len(tally.reports) < 3:
                    tally.reports.append(report)
        if i % 50 == 0:
            log(f"  single client: {i + 1}/{len(data.queries)} queries")
    out: dict[str, Any] = {"queries": len(data.queries), "loadavg_before": before, "loadavg_after": loadavg()}
    for spec, tally in tallies.items():
        out[spec] = {
            **percentiles(tally.latency_ms),
            "searches_per_s": len(tally.latency_ms) / (sum(tally.latency_ms) / 1000),
            "stage_ms_p50": {k: round(statistics.median(v), 3) for k, v in tally.stages.items()},
            "ndcg@10": round(evaluate(tally.run, data.qrels)["ndcg@10"], 4),
        }
    late, retrieve = out["late"], out["retrieve"]
    late["not_completed"] = tallies["late"].not_completed
    late["methods"] = dict(sorted(tallies["late"].methods.items(), key=lambda kv: -kv[1])[:5])
    late["sample_reports"] = tallies["late"].reports
    li_stage = late["stage_ms_p50"].get("late_interaction", float("nan"))
    out["li_stage_over_retrieve_stage"] = li_stage / retrieve["stage_ms_p50"]["retrieve"]
    out["li_stage_over_own_retrieve_stage"] = li_stage / late["stage_ms_p50"]["retrieve"]
    out["searches_per_s_ratio"] = late["searches_per_s"] / retrieve["searches_per_s"]
    return out


async def _pass(address: str, queries: list[str], clients: int, spec: str) -> dict[str, Any]:
    requests = [
        search_pb2.SearchRequest(
            collection=LATE, query=text, top_k=10, omit_documents=True, settings=SETTINGS[spec]
        )
        for text in queries
    ]
    done = await search_pass(address, requests, clients)
    return {**done, "completed": len(done["latency_ms"])}


def concurrency(
    address: str, cache: redis.Redis, pool: list[str], clients: int, rounds: int, per_pass: int
) -> dict[str, Any]:
    before = loadavg()
    for spec in SETTINGS:  # warm-up: connections, executor threads, workers
        asyncio.run(_pass(address, pool[:clients], clients, spec))
    passes: dict[str, list[dict[str, Any]]] = {spec: [] for spec in SETTINGS}
    offset = 0
    for r in range(rounds):
        for spec in ("retrieve", "late") if r % 2 == 0 else ("late", "retrieve"):
            queries = [pool[(offset + j) % len(pool)] for j in range(per_pass)]
            offset += per_pass
            empty_query_caches(cache)
            result = asyncio.run(_pass(address, queries, clients, spec))
            passes[spec].append(result)
            log(
                f"  concurrency {clients}, round {r + 1}, {spec}: {result['completed'] / result['wall_s']:.1f} q/s"
            )
    out: dict[str, Any] = {"clients": clients, "rounds": rounds, "per_pass": per_pass}
    for spec, results in passes.items():
        latencies = [x for res in results for x in res["latency_ms"]]
        out[spec] = {
            "throughput_qps": sum(res["completed"] for res in results)
            / sum(res["wall_s"] for res in results),
            "per_round_qps": [round(res["completed"] / res["wall_s"], 2) for res in results],
            **percentiles(latencies),
            "errors": _sum_counts(res["errors"] for res in results),
            "degraded": sum(res["degraded"] for res in results),
        }
    out["ratio"] = out["late"]["throughput_qps"] / out["retrieve"]["throughput_qps"]
    out["loadavg_before"], out["loadavg_after"] = before, loadavg()
    return out


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def flush(channel: grpc.Channel, cache: redis.Redis, data: BeirDataset, count: int) -> dict[str, Any]:
    search = search_pb2_grpc.SearchServiceStub(channel)
    before = loadavg()
    settings = common_pb2.SearchSettings(
        retrieve_candidates=100, late_interaction=common_pb2.STAGE_MODE_REQUIRED, late_interaction_keep=10
    )

    def once(text: str) -> tuple[float, dict[str, Any] | None]:
        request = search_pb2.SearchRequest(
            collection=LATE, query=text, top_k=10, omit_documents=True, settings=settings
        )
        t = time.perf_counter()
        response = search.Search(request, timeout=RERANK_TIMEOUT_S + 30)
        return (time.perf_counter() - t) * 1000, late_report(response)

    rows = []
    for text in list(data.queries.values())[:count]:
        warm = []
        for _ in range(3):
            empty_query_caches(cache)
            warm.append(once(text))
        cache.flushall()
        first_ms, first_report = once(text)
        warm_ms = statistics.median(ms for ms, _ in warm)
        warm_stage = statistics.median(r["took_ms"] for _, r in warm if r is not None)
        rows.append(
            {
                "warm_ms": round(warm_ms, 3),
                "first_ms": round(first_ms, 3),
                "warm_stage_ms": round(warm_stage, 3),
                "first_stage_ms": round(first_report["took_ms"], 3) if first_report else None,
                "first_status": first_report["status"] if first_report else None,
                "first_method": first_report["method"] if first_report else None,
                "warm_method": warm[-1][1]["method"] if warm[-1][1] else None,
            }
        )
        log(
            f"  flush: warm {warm_ms:.1f} ms, first after FLUSHALL {first_ms:.1f} ms ({rows[-1]['first_method']!r})"
        )
    ratios = [r["first_ms"] / r["warm_ms"] for r in rows]
    return {
        "queries": len(rows),
        "candidates": 100,
        "ratio_median": statistics.median(ratios),
        "ratio_max": max(ratios),
        "warm_ms_median": statistics.median(r["warm_ms"] for r in rows),
        "first_ms_median": statistics.median(r["first_ms"] for r in rows),
        "stage_ratio_median": statistics.median(
            r["first_stage_ms"] / r["warm_stage_ms"] for r in rows if r["first_stage_ms"] is not None
        ),
        "rows": rows,
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }


# -- driver ----------------------------------------------------------------------------------------------


def all_query_texts(folder: Path, data: BeirDataset) -> list[str]:
    """Every query of the data set (not only the test split's): distinct queries for the concurrency passes."""
    import json

    texts = []
    with (folder / "queries.jsonl").open() as f:
        for line in f:
            if line.strip():
                texts.append(str(json.loads(line)["text"]))
    return texts or list(data.queries.values())


def judge(figures: dict[str, float]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = figures.get(name)
        met = value is not None and not np.isnan(value) and (value <= bound if op == "<=" else value >= bound)
        out[name] = {
            "value": None if value is None else round(float(value), 3),
            "target": f"{op} {bound}",
            "met": bool(met),
        }
    return out


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path, nargs="?", default=DEFAULT_BEIR)
    parser.add_argument(
        "--limit-docs", type=int, default=None, help="smoke run: judged documents plus the first others"
    )
    parser.add_argument("--limit-queries", type=int, default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the concurrency section")
    parser.add_argument("--per-pass", type=int, default=300, help="queries per concurrency pass")
    parser.add_argument("--flush-queries", type=int, default=10)
    parser.add_argument(
        "--server-blas-threads",
        type=int,
        default=None,
        help="experiment: OPENBLAS_NUM_THREADS for the service's processes (default: as inherited)",
    )
    parser.add_argument(
        "--index-block", type=int, default=4, help="batches of 64 per alternating indexing block"
    )
    args = parser.parse_args()
    if not (args.beir / "corpus.jsonl").is_file():
        print(f"no BEIR data set at {args.beir} (corpus.jsonl missing): nothing measured", file=sys.stderr)
        return 0
    from late_interaction_reference import limit_dataset

    started = time.monotonic()
    quick = args.limit_docs is not None or args.limit_queries is not None
    data = limit_dataset(load_beir(args.beir, "test"), args.limit_docs, args.limit_queries)
    pool = all_query_texts(args.beir, data)
    redis_port = free_port()
    result: dict[str, Any] = {
        "dataset": data.name,
        "documents": len(data.corpus),
        "test_queries": len(data.queries),
        "service_openblas_threads": str(
            args.server_blas_threads or os.environ.get("OPENBLAS_NUM_THREADS", "default")
        ),
    }
    with tempfile.TemporaryDirectory(prefix="sieve-li-bench-") as tmp:
        log_path = Path(tmp) / "service.log"
        with sieve_run(Path(tmp) / "data", redis_port, log_path, args.server_blas_threads) as address:
            cache = redis.Redis(host="127.0.0.1", port=redis_port)
            with grpc.insecure_channel(address) as channel:
                create_collections(channel)
                log(f"indexing {len(data.corpus)} documents into a late-interaction and a plain collection")
                result["indexing"] = indexing(channel, cache, data, args.index_block)
                log(f"single client, {len(data.queries)} queries, retrieve and late alternating")
                result["single_client"] = single_client(channel, cache, data)
                log(f"concurrency {args.clients}")
                result["concurrency"] = concurrency(
                    address, cache, pool, args.clients, args.rounds, args.per_pass
                )
                log(f"first late-interaction search after FLUSHALL vs warm, {args.flush_queries} queries")
                result["flush"] = flush(channel, cache, data, args.flush_queries)
                result["method"] = result["single_client"]["late"]["methods"]
        result["service_log_tail"] = log_path.read_text(errors="replace")[-2000:]
    single = result["single_client"]
    result["targets"] = judge(
        {
            "li_stage_p50_over_retrieve_stage_p50": single["li_stage_over_retrieve_stage"],
            "searches_per_s_late_over_retrieve": single["searches_per_s_ratio"],
            "concurrency_throughput_late_over_retrieve": result["concurrency"]["ratio"],
            "indexing_docs_per_s_late_over_plain": result["indexing"]["ratio"],
            "first_after_flush_over_warm": result["flush"]["ratio_median"],
        }
    )
    report(result)
    write_result(
        "late_interaction_service",
        result,
        command=command_line("bench/late_interaction_service.py", sys.argv[1:]),
        quick=quick,
        started=started,
    )
    return 0


def report(result: dict[str, Any]) -> None:
    s, c, i, f = result["single_client"], result["concurrency"], result["indexing"], result["flush"]
    r, li = s["retrieve"], s["late"]
    print(
        f"single client ({s['queries']} queries): retrieve p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms, "
        f"{r['searches_per_s']:.1f}/s, nDCG@10 {r['ndcg@10']:.4f}; late p50 {li['p50_ms']:.1f} ms "
        f"p99 {li['p99_ms']:.1f} ms, {li['searches_per_s']:.1f}/s, nDCG@10 {li['ndcg@10']:.4f}"
    )
    print(f"  stage p50s: retrieve-only {r['stage_ms_p50']}; late {li['stage_ms_p50']}")
    print(f"  late-interaction method: {li['methods']}")
    print(
        f"concurrency {c['clients']}: retrieve {c['retrieve']['throughput_qps']:.1f} q/s, "
        f"late {c['late']['throughput_qps']:.1f} q/s (degraded {c['late']['degraded']}, errors {c['late']['errors']})"
    )
    print(
        f"indexing: late {i['docs_per_s'][LATE]:.1f} docs/s (acknowledged {i['docs_per_s_acknowledged'][LATE]:.1f}, "
        f"then {i['late_background_s']:.1f} s of background work), plain {i['docs_per_s'][PLAIN]:.1f} docs/s"
    )
    print(
        f"flush: warm {f['warm_ms_median']:.1f} ms, first after FLUSHALL {f['first_ms_median']:.1f} ms (medians)"
    )
    for name, t in result["targets"].items():
        print(f"  {name}: {t['value']} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")


if __name__ == "__main__":
    raise SystemExit(main())
