"""Client overhead: the Python facade's added latency per Search vs a raw generated-stub call, same run.

    .venv/bin/python bench/client_overhead.py [--calls 1000] [--out bench/results/client-overhead.json]

A `sieve serve` subprocess holds a small collection (examples/data/notes.jsonl plus synthetic notes, 200
documents). On one shared channel, `SieveClient.search(...)` and the raw `SearchServiceStub.Search(
SearchRequest(...), timeout=10)` alternate query by query (which goes first alternates too), so machine
noise hits both alike. The added latency is the median of the per-pair differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np
from sieve import SieveClient
from sieve.v1 import search_pb2, search_pb2_grpc

from sieve_cli import stack

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "examples" / "data" / "notes.jsonl"
WORDS = [
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "gravel",
    "harbor",
    "iris",
    "juniper",
    "kelp",
    "lotus",
    "maple",
    "nectar",
    "onyx",
    "pine",
]
QUERIES = [
    "how does light carry energy",
    "animals that hunt at night",
    "baking bread at home",
    "what makes the tides",
    "how a search index finds neighbours",
    "rain brought by seasonal winds",
    "particles inside the proton",
    "a fast answer for repeated requests",
]


def _documents(total: int) -> list[dict[str, object]]:
    docs: list[dict[str, object]] = [json.loads(line) for line in NOTES.read_text().splitlines()]
    for i in range(total - len(docs)):
        words = " ".join(WORDS[(i * k + k) % len(WORDS)] for k in (1, 3, 5, 7, 11))
        docs.append({"id": f"syn-{i}", "text": f"note {i}: {words}", "metadata": {"topic": "synthetic"}})
    return docs


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="Search calls of each kind (>= 500)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "client-overhead.json")
    args = parser.parse_args()

    facade_ms: list[float] = []
    raw_ms: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="sieve-bench-") as data_dir,
        stack.sieve_process(
            "serve", data_dir=Path(data_dir), settings={"SIEVE_LOG_LEVEL": "WARNING"}
        ) as served,
        grpc.insecure_channel(served.address) as channel,
    ):
        address = served.address
        client = SieveClient(address, channel=channel)
        client.create_collection("overhead")
        client.upsert_documents("overhead", _documents(args.documents))
        stub = search_pb2_grpc.SearchServiceStub(channel)

        def facade(query: str) -> float:
            t = time.perf_counter()
            client.search("overhead", query, top_k=10)
            return (time.perf_counter() - t) * 1000

        def raw(query: str) -> float:
            t = time.perf_counter()
            stub.Search(search_pb2.SearchRequest(collection="overhead", query=query, top_k=10), timeout=10)
            return (time.perf_counter() - t) * 1000

        for i in range(args.warmup):
            facade(QUERIES[i % len(QUERIES)])
            raw(QUERIES[i % len(QUERIES)])
        for i in range(args.calls):
            query = QUERIES[i % len(QUERIES)]
            if i % 2:
                raw_ms.append(raw(query))
                facade_ms.append(facade(query))
            else:
                facade_ms.append(facade(query))
                raw_ms.append(raw(query))

    added = [f - r for f, r in zip(facade_ms, raw_ms, strict=True)]
    result = {
        "benchmark": "client-overhead",
        "command": "python bench/client_overhead.py",
        "documents": args.documents,
        "samples": args.calls,
        "facade_p50_ms": statistics.median(facade_ms),
        "facade_p99_ms": _pct(facade_ms, 99),
        "raw_p50_ms": statistics.median(raw_ms),
        "raw_p99_ms": _pct(raw_ms, 99),
        "added_p50_ms": statistics.median(added),
        "added_p50_share": statistics.median(added) / statistics.median(raw_ms),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": metadata.version("grpcio"),
            "protobuf": metadata.version("protobuf"),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"facade Search p50 {result['facade_p50_ms']:.3f} ms  p99 {result['facade_p99_ms']:.3f} ms")
    print(f"raw stub       p50 {result['raw_p50_ms']:.3f} ms  p99 {result['raw_p99_ms']:.3f} ms")
    print(
        f"added per call (median of pairs) {result['added_p50_ms'] * 1000:.0f} us "
        f"({result['added_p50_share']:.1%} of the raw call)"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
