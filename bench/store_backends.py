"""Search latency through a PostgreSQL-backed server vs an SQLite-backed one, on the same machine, interleaved.

    .venv/bin/python bench/store_backends.py [--documents 20000] [--queries 400]

Two `sieve serve` processes run at once: one on its SQLite file (the default), one with SIEVE_STORE_URL on a
PostgreSQL 15 cluster that this script starts from the machine's packages (sieve_cli/pg_cluster.py: a unix
socket, fsync and synchronous_commit on). Both get the same corpus through UpsertDocuments, bench/search_corpus.py's
`fill`: bench/ann.py's synthetic 384-d vectors with short texts. Then, for each query, one Search to each server,
in a random order per pair (so drift and noise hit both alike), one client, one request at a time:
- by vector (SearchRequest.query_vector), top 10 with their documents: the index search and the store's
  read of the hits' documents, no model in the way;
- by text (SearchRequest.query), top 10 with documents: what a client usually sends (the query embedding
  dominates it).
Reported: client-side p50/p99 per backend and mode, and the PostgreSQL/SQLite ratio of the p50s; the load
average at the start and the end (the machine is shared). Result: bench/results/store_backends.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
from ann import synthetic, synthetic_queries
from run import command_line, log, percentiles, write_result
from search_corpus import fill
from sieve.v1 import collections_pb2, collections_pb2_grpc, documents_pb2_grpc, search_pb2, search_pb2_grpc

from sieve_cli import stack
from sieve_cli.pg_cluster import PostgresCluster

NAME = "corpus"


def serve(stack_: ExitStack, data_dir: Path, settings: dict[str, str], create: bool = True) -> Any:
    """A `sieve serve` (stopped when `stack_` closes) and a channel to it; with `create`, the collection."""
    served = stack_.enter_context(
        stack.sieve_process(
            "serve", data_dir=data_dir, settings={"SIEVE_LOG_LEVEL": "WARNING", **settings}, timeout_s=300
        )
    )
    channel = stack_.enter_context(grpc.insecure_channel(served.address))
    if not create:
        return channel
    collections_pb2_grpc.CollectionServiceStub(channel).CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=NAME)), timeout=60
    )
    return channel


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    started = time.monotonic()
    load_before = os.getloadavg()
    corpus = synthetic(args.documents)
    vectors = synthetic_queries(args.documents, args.queries)
    rng = random.Random(0)
    texts = [f"synthetic document {rng.randrange(args.documents)}" for _ in range(args.queries)]
    samples: dict[tuple[str, str], list[float]] = {}
    # The data directories outlive the servers (ExitStack stops them first), whose graceful stop writes there.
    with tempfile.TemporaryDirectory(prefix="sieve-backends-") as tmp, ExitStack() as stack_:
        cluster = stack_.enter_context(PostgresCluster())
        channels = {
            "sqlite": serve(stack_, Path(tmp) / "sqlite", {}),
            "postgres": serve(stack_, Path(tmp) / "pg", {"SIEVE_STORE_URL": cluster.new_database()}),
        }
        for backend, channel in channels.items():
            log(f"{backend}: upserting {args.documents:,} documents with their vectors")
            took = fill(documents_pb2_grpc.DocumentServiceStub(channel), NAME, corpus, args.batch)
            log(f"{backend}: {args.documents / took:,.0f} documents/s")
        stubs = {b: search_pb2_grpc.SearchServiceStub(c) for b, c in channels.items()}
        requests = {
            "vector": [
                search_pb2.SearchRequest(collection=NAME, query_vector=v.tolist(), top_k=10) for v in vectors
            ],
            "text": [search_pb2.SearchRequest(collection=NAME, query=t, top_k=10) for t in texts],
        }
        for mode, batch in requests.items():
            for i, request in enumerate(batch):
                order = list(stubs)
                rng.shuffle(order)
                for backend in order:
                    t = time.perf_counter()
                    response = stubs[backend].Search(request, timeout=30)
                    ms = (time.perf_counter() - t) * 1000
                    assert len(response.hits) == 10 and response.hits[0].text
                    if i >= 20:  # the first calls warm channels, caches and prepared statements
                        samples.setdefault((mode, backend), []).append(ms)
    result: dict[str, Any] = {
        "what": "Search through gRPC, one client, top 10 with documents; two servers on the same machine, one on "
        "SQLite, one on PostgreSQL 15 (unix socket), the same synthetic corpus; requests alternated in a random "
        "order per query",
        "documents": args.documents,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    for mode in requests:
        sqlite, pg = percentiles(samples[(mode, "sqlite")]), percentiles(samples[(mode, "postgres")])
        ratio = pg["p50_ms"] / sqlite["p50_ms"]
        result[mode] = {"sqlite": sqlite, "postgres": pg, "p50_ratio_pg_vs_sqlite": round(ratio, 3)}
        log(f"{mode}: p50 SQLite {sqlite['p50_ms']:.2f} ms, PostgreSQL {pg['p50_ms']:.2f} ms: {ratio:.2f}x")
    write_result(
        "store_backends",
        result,
        command=command_line("bench/store_backends.py", sys.argv[1:]),
        quick=False,
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
