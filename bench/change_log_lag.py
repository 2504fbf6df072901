"""Change-log catch-up lag: how long after a write is acknowledged by one server another server shows it.

    .venv/bin/python bench/change_log_lag.py [--rate 100] [--seconds 30]

Two `sieve serve` processes over one PostgreSQL database (a cluster this script starts from the machine's
packages, sieve_cli/pg_cluster.py). A writer sends single-document UpsertDocuments with precomputed vectors
(bench/ann.py's synthetic 384-d) to server A at `--rate` writes/s (open loop: each sent at its scheduled time
by one of 4 sending threads); as each is acknowledged, one of 4 readers asks server B for a Search by that document's vector
with `min_generation` = the write's generation (B waits until its indexes show it). Lag = time from A's
acknowledgement to B's answer (an upper bound: it includes B's search, ~3-5 ms). Reported: the achieved
write rate, lag p50/p90/p99, and that every answer's top hit was the document just written. Result:
bench/results/change_log_lag.json.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ann import synthetic
from run import MODEL, command_line, log, percentiles, write_result
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from store_backends import NAME, serve

from sieve_cli.pg_cluster import PostgresCluster

READERS = WRITERS = 4


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100.0, help="writes per second sent to server A")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    started = time.monotonic()
    load_before = os.getloadavg()
    count = int(args.rate * args.seconds)
    vectors = synthetic(count, seed=7)
    acked: queue.Queue[tuple[int, int, float] | None] = queue.Queue()
    lags: list[float] = []
    wrong: list[dict[str, Any]] = []  # Searches on B whose top hit was not the document just written
    with tempfile.TemporaryDirectory(prefix="sieve-lag-") as tmp, ExitStack() as stack_:
        url = stack_.enter_context(PostgresCluster()).new_database()
        a = serve(stack_, Path(tmp) / "a", {"SIEVE_STORE_URL": url})
        b = serve(stack_, Path(tmp) / "b", {"SIEVE_STORE_URL": url}, create=False)
        deadline = time.monotonic() + 30
        listing = collections_pb2_grpc.CollectionServiceStub(b)
        while NAME not in {
            c.name for c in listing.ListCollections(collections_pb2.ListCollectionsRequest()).collections
        }:
            assert time.monotonic() < deadline, "server B never showed the collection"
            time.sleep(0.05)
        documents = documents_pb2_grpc.DocumentServiceStub(a)

        def read() -> None:
            search = search_pb2_grpc.SearchServiceStub(b)
            while (item := acked.get()) is not None:
                i, generation, acked_at = item
                request = search_pb2.SearchRequest(
                    collection=NAME,
                    query_vector=vectors[i].tolist(),
                    top_k=3,
                    min_generation=generation,
                    omit_documents=True,
                )
                response = search.Search(request, timeout=30)
                lags.append((time.perf_counter() - acked_at) * 1000)
                if not response.hits or response.hits[0].id != f"d{i}":
                    # What B answered, so that a miss can be told apart: the write not yet in B's index (a
                    # read-your-writes failure) or an approximate top hit (HNSW) with it lower or absent.
                    wrong.append(
                        {
                            "id": f"d{i}",
                            "min_generation": generation,
                            "answered_generation": response.generation,
                            "hits": [(h.id, round(h.score, 5)) for h in response.hits],
                        }
                    )

        def write(i: int) -> None:
            doc = documents_pb2.Document(
                id=f"d{i}", text=f"synthetic document {i}", vector=vectors[i].tolist()
            )
            response = documents.UpsertDocuments(
                documents_pb2.UpsertDocumentsRequest(collection=NAME, documents=[doc], embedding_model=MODEL),
                timeout=60,
            )
            acked.put((i, response.generation, time.perf_counter()))

        # Several readers and writers in flight, so that one slow call does not delay the next ones' clocks.
        readers = [threading.Thread(target=read) for _ in range(READERS)]
        for reader in readers:
            reader.start()
        begin = time.perf_counter()
        with ThreadPoolExecutor(WRITERS) as pool:
            for i in range(count):
                time.sleep(max(0.0, begin + i / args.rate - time.perf_counter()))
                pool.submit(write, i)
        writing_s = time.perf_counter() - begin
        for _ in readers:
            acked.put(None)
        for reader in readers:
            reader.join()
    lag = percentiles(lags[10:])  # the first writes warm channels and prepared statements
    result: dict[str, Any] = {
        "what": "lag from a write acknowledged by server A to server B answering a Search with that write's "
        "min_generation; two servers over one PostgreSQL 15 database on the same machine",
        "target_writes_per_s": args.rate,
        "achieved_writes_per_s": round(count / writing_s, 1),
        "writes": count,
        "lag": lag,
        "top_hit_not_the_written_document": len(wrong),
        "not_first": wrong[:20],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    log(
        f"{count / writing_s:.0f} writes/s through A; lag to B p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms"
        f" ({len(wrong)} wrong top hits)"
    )
    write_result(
        "change_log_lag",
        result,
        command=command_line("bench/change_log_lag.py", sys.argv[1:]),
        quick=False,
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
