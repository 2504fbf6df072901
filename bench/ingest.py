"""Ingest benchmark: a SciFact index job on 1 and on 2 worker processes vs bare in-process ONNX embedding.

    .venv/bin/python bench/ingest.py ../shared/datasets/scifact [--out bench/results/ingest.json]

Everything runs in one process tree, one thing at a time, so that each measurement has the machine to
itself: its own redis-server on a free port, a `sieve serve` subprocess (SIEVE_REDIS_URL set), and a
Celery embed worker with -c 1 (one pool process, ONNX intra-op threads = cores) or -c 2 (two pool
processes, cores // 2 threads each), started and warm before its job. The sequence is

    bare embedding pass -> job, 1 worker -> job, 2 workers -> bare embedding pass

so the bare rate (median of the two passes) brackets the jobs in time on this shared, noisy machine.
The bare pass embeds the same texts (BEIR's title + " " + text), in the same batches (the job's batch
size, SIEVE_EMBED_BATCH_SIZE texts per ONNX run), with a BiEncoderRunner in this process. A job's rate
is end to end, as a client sees it: documents / (time from StartIndexJob to the job's final state).

Quality: the 1-worker job's collection is searched with the test queries exactly as `sieve eval` does
(top_k 100, bi-encoder retrieval, ids only) and scored with sieve_core.beir.evaluate; then `sieve eval`'s
own code (server.evaluate.run_eval) indexes the corpus through UpsertDocuments on the same server and
scores it. The two nDCG@10 figures should be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import grpc
import redis
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from server.evaluate import EvalOptions, free_port, run_eval, wait_serving
from sieve_core.beir import evaluate, load_beir
from sieve_core.config import load_settings
from sieve_core.models.bi_encoder import BiEncoderRunner

ROOT = Path(__file__).resolve().parent.parent
MODEL = "all-MiniLM-L6-v2"
FINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/ensure_redis.sh installs it)")
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
    proc = subprocess.Popen([*argv, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(SIEVE_MODELS_DIR=str(ROOT / "models"), SIEVE_LOG_LEVEL="WARNING", **extra)
    return env


@contextmanager
def server(data_dir: Path, redis_url: str) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    env = _env(SIEVE_DATA_DIR=str(data_dir), SIEVE_GRPC_ADDRESS=address, SIEVE_REDIS_URL=redis_url)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT)
    try:
        wait_serving(address, 120, proc)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@contextmanager
def worker(redis_url: str, processes: int, log_path: Path) -> Iterator[None]:
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "embed"]
    argv += ["-c", str(processes), "-n", f"bench-{processes}@%h", "--loglevel", "INFO"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            env=_env(SIEVE_REDIS_URL=redis_url),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while log_path.read_text(errors="replace").count("warm in") < processes:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bare_rate(texts: list[str], batch: int, per_run: int) -> float:
    runner = BiEncoderRunner(ROOT / "models" / MODEL)
    runner.warmup()
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        runner.embed(texts[i : i + batch], per_run)
    return len(texts) / (time.perf_counter() - started)


def run_job(address: str, collection: str, corpus: Path) -> tuple[float, jobs_pb2.Job]:
    with grpc.insecure_channel(address) as channel:
        collections_pb2_grpc.CollectionServiceStub(channel).CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=collection)),
            timeout=60,
        )
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        started = time.perf_counter()
        job = jobs.StartIndexJob(
            jobs_pb2.StartIndexJobRequest(collection=collection, path=str(corpus.resolve())), timeout=60
        ).job
        last_print = 0.0
        for message in jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job.id, min_interval_ms=1000), timeout=7200):
            job = message.job
            if time.monotonic() - last_print > 15:
                log(
                    f"  {collection}: {job.done}/{job.total} at {job.docs_per_second:.1f} docs/s {job.status}"
                )
                last_print = time.monotonic()
        elapsed = time.perf_counter() - started
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"job {job.id} ended {jobs_pb2.JobState.Name(job.state)}: {job.reason}")
    return (job.done + job.failed) / elapsed, job


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    corpus = args.beir / "corpus.jsonl"
    if not corpus.is_file():
        print(f"skipped: {args.beir} is not a BEIR folder", file=sys.stderr)
        return 0
    data = load_beir(args.beir)
    texts = list(data.corpus.values())  # title + " " + text, as the job reads BEIR lines
    settings = load_settings({})
    batch, per_run = settings.job_batch_size, settings.embed_batch_size

    with tempfile.TemporaryDirectory(prefix="sieve-ingest-") as tmp:
        tmp_dir = Path(tmp)
        log(f"bare pass 1: {len(texts)} texts, batches of {batch} ({per_run} per ONNX run)")
        bare = [bare_rate(texts, batch, per_run)]
        log(f"  {bare[0]:.1f} docs/s")
        with redis_server(tmp_dir) as url, server(tmp_dir / "data", url) as address:
            rates: dict[int, float] = {}
            jobs: dict[int, jobs_pb2.Job] = {}
            for processes in (1, 2):
                with worker(url, processes, tmp_dir / f"worker-{processes}.log"):
                    log(f"job with {processes} worker process(es)")
                    rates[processes], jobs[processes] = run_job(address, f"scifact-w{processes}", corpus)
                    log(f"  {rates[processes]:.1f} docs/s")
            log(
                "scoring the 1-worker job's collection, then `sieve eval` (UpsertDocuments) on the same server"
            )
            job_metrics = score_collection(address, "scifact-w1", data, jobs[1].generation)
            upsert = run_eval(EvalOptions(folder=args.beir, address=address, quiet=True))
        log("bare pass 2")
        bare.append(bare_rate(texts, batch, per_run))
        log(f"  {bare[1]:.1f} docs/s")

    upsert_metrics = upsert["runs"][0] if "runs" in upsert else upsert  # type: ignore[index]
    bare_median = statistics.median(bare)
    result = {
        "benchmark": "ingest",
        "command": f"python bench/ingest.py {args.beir}",
        "dataset": data.name,
        "documents": len(texts),
        "job_batch_size": batch,
        "job_max_inflight_batches": settings.job_max_inflight_batches,
        "bare_docs_per_s": bare,
        "bare_docs_per_s_median": bare_median,
        "job_1_worker_docs_per_s": rates[1],
        "job_2_workers_docs_per_s": rates[2],
        "job_1_worker_vs_bare": rates[1] / bare_median,
        "job_2_workers_vs_bare": rates[2] / bare_median,
        "job_machinery_cost_1_worker": 1 - rates[1] / bare_median,
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
    print(f"bare ONNX embedding    {bare[0]:.1f} / {bare[1]:.1f} docs/s (before / after the jobs)")
    print(f"index job, 1 worker    {rates[1]:.1f} docs/s ({rates[1] / bare_median:.2f} of bare)")
    print(f"index job, 2 workers   {rates[2]:.1f} docs/s ({rates[2] / bare_median:.2f} of bare)")
    print(f"nDCG@10 job {result['ndcg@10_job']:.4f} vs UpsertDocuments {result['ndcg@10_upsert']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
