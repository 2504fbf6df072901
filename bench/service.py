"""Service benchmark: Search latency over gRPC vs the bare in-process work, and upsert vs bare embedding.

    .venv/bin/python bench/service.py ../shared/datasets/scifact [--passes 3] [--out bench/results/service.json]

Everything is measured in one run on the same machine: a `sieve serve` subprocess indexes the corpus
through UpsertDocuments; then, for the same queries, a gRPC Search (top_k=10, documents included) and the
bare work it wraps (ONNX query embedding + usearch search on the server's own index snapshot, in this
process) alternate, so machine noise hits both alike. The ratio of medians is the service's overhead.
"""

from __future__ import annotations

import argparse
import contextlib
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
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from server.storage.index import VectorIndex
from sieve_cli import stack
from sieve_core.beir import load_beir
from sieve_core.models.bi_encoder import BiEncoderRunner

ROOT = Path(__file__).resolve().parent.parent

BATCH = 64


def _serve(data_dir: str) -> contextlib.AbstractContextManager[stack.SieveProcess]:
    """`sieve serve` on the data directory, stopped gracefully (SIGTERM writes the index snapshot)."""
    return stack.sieve_process("serve", data_dir=Path(data_dir), settings={"SIEVE_LOG_LEVEL": "WARNING"})


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path)
    parser.add_argument("--passes", type=int, default=3, help="passes over the test queries")
    parser.add_argument("--bare-docs", type=int, default=1024, help="documents for the bare embedding rate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    args = parser.parse_args()
    if not (args.beir / "corpus.jsonl").is_file():
        print(f"skipped: {args.beir} is not a BEIR folder", file=sys.stderr)
        return 0
    data = load_beir(args.beir)
    ids = list(data.corpus)
    queries = list(data.queries.values())

    with tempfile.TemporaryDirectory(prefix="sieve-bench-") as data_dir:
        with _serve(data_dir) as served, grpc.insecure_channel(served.address) as ch:
            collections_pb2_grpc.CollectionServiceStub(ch).CreateCollection(
                collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name="bench"))
            )
            docs = documents_pb2_grpc.DocumentServiceStub(ch)
            batch_times: list[tuple[int, float]] = []
            for i in range(0, len(ids), BATCH):
                chunk = ids[i : i + BATCH]
                t = time.perf_counter()
                docs.UpsertDocuments(
                    documents_pb2.UpsertDocumentsRequest(
                        collection="bench",
                        documents=[documents_pb2.Document(id=d, text=data.corpus[d]) for d in chunk],
                    ),
                    timeout=600,
                )
                batch_times.append((len(chunk), time.perf_counter() - t))
                print(f"\rindexed {i + len(chunk)}/{len(ids)}", end="", file=sys.stderr)
            print(file=sys.stderr)
        # The graceful stop above wrote the index snapshot used below.
        with _serve(data_dir) as served:
            address = served.address
            runner = BiEncoderRunner(ROOT / "models" / "all-MiniLM-L6-v2")
            runner.warmup()
            n_bare = 0
            upserted_bare = 0.0
            for n, seconds in batch_times:  # the same documents, the same batch size
                if n_bare >= args.bare_docs:
                    break
                n_bare += n
                upserted_bare += seconds
            t = time.perf_counter()
            for i in range(0, n_bare, BATCH):
                runner.embed([data.corpus[d] for d in ids[i : min(i + BATCH, n_bare)]], 32)
            bare_embed_s = time.perf_counter() - t

            loaded = VectorIndex.load_latest(
                Path(data_dir) / "collections" / "1", runner.dims, "cosine", ef_search=256
            )
            assert loaded is not None, "no snapshot after a graceful stop"
            index = loaded[0]
            with grpc.insecure_channel(address) as ch:
                search = search_pb2_grpc.SearchServiceStub(ch)
                rpc_ms: list[float] = []
                server_ms: list[float] = []
                bare_ms: list[float] = []
                for q in queries[:20]:  # warm-up
                    search.Search(search_pb2.SearchRequest(collection="bench", query=q, top_k=10), timeout=10)
                    index.search(runner.embed([q])[0], 10)
                for _ in range(args.passes):
                    for q in queries:
                        t = time.perf_counter()
                        response = search.Search(
                            search_pb2.SearchRequest(collection="bench", query=q, top_k=10), timeout=10
                        )
                        rpc_ms.append((time.perf_counter() - t) * 1000)
                        server_ms.append(response.took_ms)
                        t = time.perf_counter()
                        index.search(runner.embed([q])[0], 10)
                        bare_ms.append((time.perf_counter() - t) * 1000)

    upsert_rate = n_bare / upserted_bare
    bare_rate = n_bare / bare_embed_s
    result = {
        "benchmark": "service",
        "command": f"python bench/service.py {args.beir} --passes {args.passes}",
        "dataset": data.name,
        "documents": len(ids),
        "queries": len(queries),
        "samples": len(rpc_ms),
        "search_p50_ms": statistics.median(rpc_ms),
        "search_p99_ms": _pct(rpc_ms, 99),
        "bare_p50_ms": statistics.median(bare_ms),
        "bare_p99_ms": _pct(bare_ms, 99),
        "p50_ratio": statistics.median(rpc_ms) / statistics.median(bare_ms),
        "server_took_p50_ms": statistics.median(server_ms),
        "upsert_docs_per_s": upsert_rate,
        "bare_embed_docs_per_s": bare_rate,
        "upsert_vs_bare": upsert_rate / bare_rate,
        "rate_docs": n_bare,
        "upsert_docs_per_s_full_corpus": sum(n for n, _ in batch_times) / sum(s for _, s in batch_times),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": metadata.version("onnxruntime"),
            "usearch": metadata.version("usearch"),
            "grpcio": metadata.version("grpcio"),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Search over gRPC   p50 {result['search_p50_ms']:.2f} ms  p99 {result['search_p99_ms']:.2f} ms")
    print(f"bare embed+usearch p50 {result['bare_p50_ms']:.2f} ms  p99 {result['bare_p99_ms']:.2f} ms")
    print(
        f"p50 ratio {result['p50_ratio']:.2f} (inside the server: p50 {result['server_took_p50_ms']:.2f} ms)"
    )
    print(
        f"upsert {upsert_rate:.1f} docs/s vs bare embedding {bare_rate:.1f} docs/s "
        f"(ratio {result['upsert_vs_bare']:.2f}, first {n_bare} documents)"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
