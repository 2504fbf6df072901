"""`sieve eval`: index a BEIR folder through UpsertDocuments and score it through Search, over gRPC."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from sieve_core.beir import evaluate, load_beir


@dataclass
class EvalOptions:
    folder: Path
    address: str | None = None
    split: str = "test"
    top_k: int = 100
    batch_size: int = 64
    keep: bool = False
    quiet: bool = False
    # Re-rank the retrieved `candidates` by late interaction (required: a stage that cannot run fails eval).
    late_interaction: bool = False
    candidates: int = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before serving")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} was not SERVING within {timeout:.0f}s")


@contextlib.contextmanager
def self_started_server(env: dict[str, str] | None = None, *, workers: bool = False) -> Iterator[str]:
    """A throwaway service on free loopback ports with a temporary data directory: `sieve serve`, or
    with `workers` the whole `sieve run` (its own Redis and a `colbert` worker)."""
    with tempfile.TemporaryDirectory(prefix="sieve-eval-") as data_dir:
        address = f"127.0.0.1:{free_port()}"
        child_env = {**os.environ, **(env or {}), "SIEVE_GRPC_ADDRESS": address, "SIEVE_DATA_DIR": data_dir}
        command = "serve"
        if workers:
            command = "run"
            child_env.pop("SIEVE_REDIS_URL", None)
            child_env.update(SIEVE_LOCAL_REDIS_PORT=str(free_port()), SIEVE_RUN_WORKER_QUEUES="colbert")
            # Cold candidates are encoded by the worker on first sight; give the stage time for that.
            child_env.setdefault("SIEVE_RERANK_TIMEOUT_S", "60")
        # The children's output goes to stderr: stdout is for the result (one JSON object with --json).
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", command], env=child_env, stdout=sys.stderr
        )
        try:
            wait_serving(address, timeout=120, proc=proc)
            yield address
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=quiet,
        transient=False,
    )


def run_eval(opts: EvalOptions) -> dict[str, object]:
    data = load_beir(opts.folder, opts.split)
    if opts.address:
        return _eval_on(opts.address, data, opts)
    with self_started_server(workers=opts.late_interaction) as address:
        return _eval_on(address, data, opts)


def _eval_on(address: str, data, opts: EvalOptions) -> dict[str, object]:  # type: ignore[no-untyped-def]
    name = f"eval-{data.name}-{uuid.uuid4().hex[:8]}"
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        collections = collections_pb2_grpc.CollectionServiceStub(channel)
        documents = documents_pb2_grpc.DocumentServiceStub(channel)
        search = search_pb2_grpc.SearchServiceStub(channel)
        collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name)),
            timeout=60,
        )
        try:
            ids = list(data.corpus)
            started = time.perf_counter()
            with _progress(opts.quiet) as bar:
                task = bar.add_task("indexing", total=len(ids), rate="")
                for i in range(0, len(ids), opts.batch_size):
                    batch = [
                        documents_pb2.Document(id=d, text=data.corpus[d])
                        for d in ids[i : i + opts.batch_size]
                    ]
                    documents.UpsertDocuments(
                        documents_pb2.UpsertDocumentsRequest(collection=name, documents=batch), timeout=600
                    )
                    done = i + len(batch)
                    bar.update(
                        task, completed=done, rate=f"{done / (time.perf_counter() - started):.1f} docs/s"
                    )
            index_s = time.perf_counter() - started
            run: dict[str, list[str]] = {}
            cascade = common_pb2.SearchSettings()
            if opts.late_interaction:
                cascade = common_pb2.SearchSettings(
                    retrieve_candidates=max(opts.candidates, opts.top_k),
                    late_interaction=common_pb2.STAGE_MODE_REQUIRED,
                    late_interaction_keep=opts.top_k,
                )
            started = time.perf_counter()
            with _progress(opts.quiet) as bar:
                task = bar.add_task("searching", total=len(data.queries), rate="")
                for n, (qid, text) in enumerate(data.queries.items(), 1):
                    response = search.Search(
                        search_pb2.SearchRequest(
                            collection=name,
                            query=text,
                            top_k=opts.top_k,
                            omit_documents=True,
                            settings=cascade,
                        ),
                        timeout=120,
                    )
                    run[qid] = [hit.id for hit in response.hits]
                    bar.update(task, completed=n, rate=f"{n / (time.perf_counter() - started):.1f} q/s")
            search_s = time.perf_counter() - started
        finally:
            if not opts.keep:
                collections.DeleteCollection(collections_pb2.DeleteCollectionRequest(name=name), timeout=60)
    metrics = evaluate(run, data.qrels)
    return {
        "dataset": data.name,
        "split": opts.split,
        "documents": len(data.corpus),
        "queries": len(data.queries),
        "cascade": f"retrieve {opts.candidates} > late_interaction" if opts.late_interaction else "retrieve",
        **metrics,
        "index_docs_per_s": len(data.corpus) / index_s,
        "search_queries_per_s": len(data.queries) / search_s,
        "collection": name if opts.keep else None,
    }
