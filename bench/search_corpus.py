"""Search through gRPC against corpus size: a real `sieve serve` holding 100k and 1M synthetic documents.

    .venv/bin/python bench/search_corpus.py [--sizes 100000 1000000] [--queries 500] [--batch 1000]
        [--max-fill-s SECONDS] [--set SIEVE_NAME=VALUE ...] [--result NAME]

For each size: a fresh `sieve serve` (temporary data directory, no workers, no Redis), one collection of the
default embedding model (all-MiniLM-L6-v2, 384-d), filled through UpsertDocuments with precomputed vectors
(Document.vector, UpsertDocumentsRequest.embedding_model): bench/ann.py's synthetic 384-d mixture, so that
the corpus can be 1M without hours of embedding; each document's text is a short label ("synthetic document
N"), indexed by the full-text index too. Progress and the upsert rate are logged as it goes: the HNSW inserts
dominate (about 0.5-0.7 ms of CPU per document up to 100k, more as the graph grows), so on 2 cores shared with
other work 1M takes hours; --max-fill-s stops the upsert after that long and measures what was loaded (the
result says how many). Then one client, one request at a time: Search by vector
(SearchRequest.query_vector, fresh draws from the same mixture) for the top 10, ids only: latency p50/p99 as
the client sees it, the server's retrieve stage time, and recall@10 against exact search over the same
vectors; the server's resident memory after loading. Search by vector skips the query embedding (a fixed
~5-7 ms here whatever the corpus size; bench/scaling.py's service section measures it), so these are the
corpus-size-dependent part of a Search plus the service's own overhead. Results: bench/results/search_corpus.json,
written after each size. `--set` gives the server other settings (e.g. SIEVE_HNSW_CONNECTIVITY=32
SIEVE_DEFAULT_EF_SEARCH=128, to measure a candidate default), recorded in the result, which then goes to
bench/results/<--result>.json so as not to replace the defaults' figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from ann import exact_topk, recall, synthetic, synthetic_queries
from run import MODEL, command_line, log, percentiles, write_result
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from sieve_cli import stack
from sieve_core.config import load_settings

K = 10


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fill(documents: Any, name: str, corpus: np.ndarray, batch: int, budget_s: float) -> tuple[float, int]:
    """Upsert the corpus with its vectors, for at most `budget_s` seconds; returns (seconds taken, documents
    upserted). Logs progress about every 5%."""
    started = time.perf_counter()
    step = max(batch, len(corpus) // 20 // batch * batch)
    done = 0
    for start in range(0, len(corpus), batch):
        docs = [
            documents_pb2.Document(id=f"d{i}", text=f"synthetic document {i}", vector=corpus[i].tolist())
            for i in range(start, min(len(corpus), start + batch))
        ]
        documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(collection=name, documents=docs, embedding_model=MODEL),
            timeout=600,
        )
        done = start + len(docs)
        took = time.perf_counter() - started
        if done % step == 0 or done == len(corpus):
            log(
                f"  {done:,}/{len(corpus):,} upserted ({100 * done / len(corpus):.0f}%), {done / took:,.0f}/s,"
                f" load average {os.getloadavg()[0]:.1f}"
            )
        if took > budget_s and done < len(corpus):
            log(
                f"  stopped at {done:,}/{len(corpus):,} after {took:,.0f} s (--max-fill-s), {done / took:,.0f}/s"
            )
            break
    return time.perf_counter() - started, done


def measure(n: int, n_queries: int, batch: int, budget_s: float, settings: dict[str, str]) -> dict[str, Any]:
    corpus = synthetic(n)
    queries = synthetic_queries(n, n_queries)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with (
        tempfile.TemporaryDirectory(prefix="sieve-corpus-") as data_dir,
        stack.sieve_process("serve", data_dir=Path(data_dir), settings=settings, timeout_s=300) as served,
        grpc.insecure_channel(served.address, options=options) as channel,
    ):
        collections = collections_pb2_grpc.CollectionServiceStub(channel)
        documents = documents_pb2_grpc.DocumentServiceStub(channel)
        search = search_pb2_grpc.SearchServiceStub(channel)
        collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name="corpus")),
            timeout=60,
        )
        log(f"{n:,} documents: upserting with precomputed vectors, {batch} per call")
        load_before = os.getloadavg()[0]
        fill_s, loaded = fill(documents, "corpus", corpus, batch, budget_s)
        load_after = os.getloadavg()[0]
        rss = _rss_mb(served.proc.pid)
        truth = exact_topk(corpus[:loaded], queries)  # what was loaded, if the budget cut the fill short
        del corpus
        ms: list[float] = []
        stage_ms: list[float] = []
        found = []
        for i, q in enumerate(queries):
            request = search_pb2.SearchRequest(
                collection="corpus", query_vector=q.tolist(), top_k=K, omit_documents=True
            )
            t = time.perf_counter()
            response = search.Search(request, timeout=60)
            took = (time.perf_counter() - t) * 1000
            if i >= 20:  # the first calls warm the channel and the server's caches
                ms.append(took)
                stage_ms.append(response.stages[0].took_ms)
            found.append([int(h.id[1:]) for h in response.hits] + [-1] * (K - len(response.hits)))
    entry = {
        "documents": loaded,
        "target_documents": n,
        "upsert_batch": batch,
        "upsert_s": round(fill_s, 1),
        "upsert_docs_per_s": round(loaded / fill_s, 1),
        "load_average_during_upsert": [round(load_before, 1), round(load_after, 1)],
        "server_rss_mb": round(rss, 1),
        "search": percentiles(ms),
        "retrieve_stage_ms_p50": float(np.median(stage_ms)),
        "recall@10": recall(np.asarray(found), truth),
        "queries": len(ms),
    }
    log(
        f"  {loaded:,}: Search by vector p50 {entry['search']['p50_ms']:.2f} ms p99 {entry['search']['p99_ms']:.2f} ms "
        f"(retrieve stage {entry['retrieve_stage_ms_p50']:.2f} ms), recall@10 {entry['recall@10']:.4f}, "
        f"server RSS {rss:,.0f} MB, upserted at {entry['upsert_docs_per_s']:,.0f}/s"
    )
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--max-fill-s",
        type=float,
        default=float("inf"),
        help="stop upserting a size after this many seconds and measure what was loaded (recorded as such)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SIEVE_NAME=VALUE",
        help="a server setting other than its default (repeatable)",
    )
    parser.add_argument(
        "--result", default="", help="result name (default search_corpus, or with --set: required)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    overrides = dict(item.split("=", 1) for item in args.set)
    if any(not k.startswith("SIEVE_") for k in overrides):
        parser.error("--set takes SIEVE_NAME=VALUE")
    if overrides and not args.result:
        parser.error("--set measures settings other than the defaults: name the result with --result")
    settings = load_settings(overrides)
    results: list[dict[str, Any]] = []
    for n in args.sizes:
        results.append(measure(n, args.queries, args.batch, args.max_fill_s, overrides))
        write_result(
            args.result or "search_corpus",
            {
                "what": "Search by vector through gRPC, one client, top 10, ids only; synthetic 384-d "
                "(bench/ann.py generator) upserted with precomputed vectors",
                "settings": {
                    "overrides": overrides,
                    "index_storage": settings.index_storage,
                    "connectivity": settings.hnsw_connectivity,
                    "ef_construction": settings.hnsw_ef_construction,
                    "ef_search": settings.default_ef_search,
                },
                "sizes": results,
            },
            command=command_line("bench/search_corpus.py", sys.argv[1:]),
            quick=False,
            started=started,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
