"""Ingest benchmark: a SciFact index job on 1 and on 2 worker processes vs bare in-process ONNX embedding.

    .venv/bin/python bench/ingest.py ../shared/datasets/scifact [--segments 6] [--out bench/results/ingest.json]

One run, one thing at a time, each measurement paired with its baseline: its own redis-server on a
free port, a `sieve serve` subprocess (SIEVE_REDIS_URL set), and a Celery embed worker with -c 1 (one
pool process, ONNX intra-op threads = cores) or -c 2 (two pool processes, cores // 2 threads each),
warm before it is measured. The corpus is cut into `--segments` contiguous parts; for each worker
configuration and each part, this process first embeds the part's texts itself (the bare rate: a
BiEncoderRunner with all cores, the job's batch size, SIEVE_EMBED_BATCH_SIZE texts per ONNX run, the
worker idle), then an index job over that part's lines runs into the configuration's collection (the
job rate: documents / time from StartIndexJob to the job's final state, as a client sees it). On this
shared, noisy machine the two halves of a pair see about the same load, so the figure to quote is the
median of the per-part ratios job / bare.

Quality: after its last part the 1-worker collection holds the whole corpus; it is searched with the test
queries exactly as `sieve eval` does (top_k 100, bi-encoder retrieval, ids only) and scored with
sieve_core.beir.evaluate; then `sieve eval`'s own code (sieve_cli.evaluate.run_eval) indexes the corpus
through UpsertDocuments on the same server and scores it. The two nDCG@10 figures should be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import grpc
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from sieve_cli import stack
from sieve_cli.evaluate import EvalOptions, run_eval
from sieve_core.beir import evaluate, load_beir
from sieve_core.config import load_settings
from sieve_core.models.bi_encoder import BiEncoderRunner

ROOT = Path(__file__).resolve().parent.parent
MODEL = "all-MiniLM-L6-v2"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    try:
        with stack.RedisProcess(directory) as redis_process:
            yield redis_process.url
    except stack.RedisUnavailable as exc:
        raise SystemExit(str(exc)) from None


@contextmanager
def server(data_dir: Path, redis_url: str) -> Iterator[str]:
    settings = {"SIEVE_REDIS_URL": redis_url, "SIEVE_LOG_LEVEL": "WARNING"}
    with stack.sieve_process("serve", data_dir=data_dir, settings=settings) as served:
        yield served.address


@contextmanager
def worker(redis_url: str, processes: int, log_path: Path) -> Iterator[None]:
    settings = {"SIEVE_LOG_LEVEL": "WARNING"}
    try:
        running = stack.start_worker(
            redis_url, log_path, queues="embed", concurrency=processes, settings=settings, name="bench"
        )
    except RuntimeError as exc:
        raise SystemExit(f"the worker did not start: {exc}") from None
    with running:
        yield


def bare_rate(runner: BiEncoderRunner, texts: list[str], batch: int, per_run: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        runner.embed(texts[i : i + batch], per_run)
    return len(texts) / (time.perf_counter() - started)


def run_job(jobs: jobs_pb2_grpc.JobServiceStub, collection: str, source: Path) -> tuple[float, jobs_pb2.Job]:
    started = time.perf_counter()
    job = jobs.StartIndexJob(
        jobs_pb2.StartIndexJobRequest(collection=collection, path=str(source.resolve())), timeout=60
    ).job
    for message in jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job.id, min_interval_ms=1000), timeout=7200):
        job = message.job
    elapsed = time.perf_counter() - started
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED or job.failed:
        raise SystemExit(
            f"job {job.id} ended {jobs_pb2.JobState.Name(job.state)} ({job.failed} bad lines): {job.reason}"
        )
    return (job.done + job.failed) / elapsed, job


def run_config(
    address: str,
    processes: int,
    parts: list[tuple[Path, list[str]]],
    runner: BiEncoderRunner,
    batch: int,
    per_run: int,
) -> tuple[list[dict[str, float]], jobs_pb2.Job]:
    """Every part: bare embedding, then a job over the same lines. Returns the pairs and the last job."""
    collection = f"scifact-w{processes}"
    pairs = []
    with grpc.insecure_channel(address) as channel:
        collections_pb2_grpc.CollectionServiceStub(channel).CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=collection)),
            timeout=60,
        )
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        for k, (source, texts) in enumerate(parts, 1):
            bare = bare_rate(runner, texts, batch, per_run)
            rate, job = run_job(jobs, collection, source)
            pairs.append(
                {
                    "documents": len(texts),
                    "bare_docs_per_s": bare,
                    "job_docs_per_s": rate,
                    "ratio": rate / bare,
                }
            )
            log(
                f"  part {k}/{len(parts)}: bare {bare:.1f} docs/s, job {rate:.1f} docs/s (ratio {rate / bare:.2f})"
            )
    return pairs, job


def score_collection(address: str, collection: str, data, generation: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The test queries through Search as `sieve eval` sends them (retrieval, top 100, ids only)."""
    run: dict[str, list[str]] = {}
    with grpc.insecure_channel(address) as channel:
        search = search_pb2_grpc.SearchServiceStub(channel)
        for qid, text in data.queries.items():
            request = search_pb2.SearchRequest(
                collection=collection, query=text, top_k=100, omit_documents=True, min_generation=generation
            )
            run[qid] = [hit.id for hit in search.Search(request, timeout=120).hits]
    return evaluate(run, data.qrels)


def _summary(pairs: list[dict[str, float]]) -> dict[str, float]:
    docs = sum(p["documents"] for p in pairs)
    return {
        "bare_docs_per_s": docs / sum(p["documents"] / p["bare_docs_per_s"] for p in pairs),
        "job_docs_per_s": docs / sum(p["documents"] / p["job_docs_per_s"] for p in pairs),
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path)
    parser.add_argument(
        "--segments", type=int, default=6, help="parts of the corpus, each measured as a pair"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    corpus = args.beir / "corpus.jsonl"
    if not corpus.is_file():
        print(f"skipped: {args.beir} is not a BEIR folder", file=sys.stderr)
        return 0
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the children below are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data = load_beir(args.beir)
    settings = load_settings({})
    batch, per_run = settings.job_batch_size, settings.embed_batch_size
    lines = [line for line in corpus.read_bytes().splitlines(keepends=True) if line.strip()]
    size = -(-len(lines) // args.segments)
    runner = BiEncoderRunner(ROOT / "models" / MODEL)
    runner.warmup()
    results: dict[int, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="sieve-ingest-") as tmp:
        tmp_dir = Path(tmp)
        parts: list[tuple[Path, list[str]]] = []
        for k in range(0, len(lines), size):
            part = tmp_dir / f"part-{k // size}.jsonl"
            part.write_bytes(b"".join(lines[k : k + size]))
            # The texts the job indexes: BEIR's title + " " + text, as load_beir builds them.
            texts = []
            for line in lines[k : k + size]:
                doc = json.loads(line)
                texts.append((doc.get("title", "") + " " + doc.get("text", "")).strip())
            parts.append((part, texts))
        with redis_server(tmp_dir) as url, server(tmp_dir / "data", url) as address:
            for processes in (1, 2):
                with worker(url, processes, tmp_dir / f"worker-{processes}.log"):
                    log(f"{processes} worker process(es), {len(parts)} parts")
                    results[processes], last = run_config(address, processes, parts, runner, batch, per_run)
                if processes == 1:
                    log(
                        "scoring the 1-worker collection, then `sieve eval` (UpsertDocuments) on the same server"
                    )
                    job_metrics = score_collection(address, "scifact-w1", data, last.generation)
                    upsert = run_eval(EvalOptions(folder=args.beir, address=address, quiet=True))

    upsert_metrics = upsert["runs"][0] if "runs" in upsert else upsert  # type: ignore[index]
    one, two = _summary(results[1]), _summary(results[2])
    result = {
        "benchmark": "ingest",
        "command": f"python bench/ingest.py {args.beir} --segments {args.segments}",
        "dataset": data.name,
        "documents": len(lines),
        "job_batch_size": batch,
        "job_max_inflight_batches": settings.job_max_inflight_batches,
        "bare_docs_per_s_1": one["bare_docs_per_s"],
        "job_1_worker_docs_per_s": one["job_docs_per_s"],
        "job_1_worker_vs_bare_median": one["median_ratio"],
        "bare_docs_per_s_2": two["bare_docs_per_s"],
        "job_2_workers_docs_per_s": two["job_docs_per_s"],
        "job_2_workers_vs_bare_median": two["median_ratio"],
        "pairs_1_worker": results[1],
        "pairs_2_workers": results[2],
        "ndcg@10_job": job_metrics["ndcg@10"],
        "recall@100_job": job_metrics["recall@100"],
        "ndcg@10_upsert": upsert_metrics["ndcg@10"],  # type: ignore[index]
        "recall@100_upsert": upsert_metrics["recall@100"],  # type: ignore[index]
        "upsert_docs_per_s": upsert["index_docs_per_s"],  # type: ignore[index]
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": metadata.version("onnxruntime"),
            "celery": metadata.version("celery"),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for n, summary in ((1, one), (2, two)):
        print(
            f"index job, {n} worker process(es): {summary['job_docs_per_s']:.1f} docs/s; bare ONNX in the same parts "
            f"{summary['bare_docs_per_s']:.1f} docs/s; median ratio job/bare {summary['median_ratio']:.2f}"
        )
    print(f"nDCG@10 job {result['ndcg@10_job']:.4f} vs UpsertDocuments {result['ndcg@10_upsert']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
