"""Choosing the vector index's settings by measurement: index layouts and connectivity vs FAISS HNSW, each at
the smallest ef that reaches a recall target.

    .venv/bin/python bench/ann_tune.py [--size 100000] [--queries 1000] [--target 0.95] [--threads N]
        [--configs ip-f16:16 cos-i8:16 ...] [--rounds 3]

Data: bench/ann.py's synthetic mixture (384-d, normalised, one cluster per 1,000 vectors, seed 0) and fresh
queries from it; ground truth by exact float32 search.

Systems: the server's own VectorIndex (server/storage/index.py) in each layout asked for (`f16`: cosine as
inner product on normalised f16 vectors, the default; `i8`: int8 under the cosine kernel, each vector scaled
to max-abs 1; `f32`: the same as f16 in f32), with connectivity M; and FAISS IndexHNSWFlat (M=16, inner
product, f32). ef_construction is the server's (200) for all.

Per system: ef sweep (recall@10 over all queries, batch search) from small to large, stopping at the first
ef whose recall reaches --target; then, at that ef, batch QPS (--rounds rounds over all queries, the
systems in turn; median round) and one-query latency (one thread, systems in turn per query), and memory
per vector: the serialized index (usearch serialized_length, FAISS write_index size; both hold the vectors
and the graph) and the process's resident growth over the build. Writes bench/results/ann_tune.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import numpy as np
from ann import (
    EF_CONSTRUCTION,
    Faiss,
    _single_threaded,
    exact_topk,
    recall,
    rss_bytes,
    synthetic,
    synthetic_queries,
)
from run import available_cores, command_line, log, percentiles, write_result

from server.storage.index import VectorIndex

K = 10
EFS = (16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256, 320, 384, 512, 768, 1024)
DEFAULT_CONFIGS = ("f16:16", "i8:16", "f16:12", "f16:24", "i8:24")


class Sieve:
    """The server's VectorIndex in one layout and connectivity."""

    def __init__(self, storage: str, connectivity: int, threads: int) -> None:
        self.name = f"sieve_{storage}_M{connectivity}"
        self.threads = threads
        self.index = VectorIndex(
            384,
            "cosine",
            connectivity=connectivity,
            ef_construction=EF_CONSTRUCTION,
            ef_search=64,
            storage=storage,
        )

    def build(self, corpus: np.ndarray) -> None:
        keys = np.arange(len(corpus), dtype=np.uint64)
        step = 10_000
        for start in range(0, len(corpus), step):
            # VectorIndex.add uses usearch's own threads (all cores): the server's build path.
            self.index.add(keys[start : start + step], corpus[start : start + step])

    def set_ef(self, ef: int) -> None:
        self.index.default_ef = ef
        self.index._index.expansion_search = ef  # type: ignore[misc]

    def batch(self, queries: np.ndarray) -> np.ndarray:
        return self.index.search_batch(queries, K, threads=self.threads).astype(np.int64)

    def one(self, query: np.ndarray) -> None:
        self.index.search(query, K)

    def bytes_per_vector(self, n: int) -> float:
        return self.index.memory_bytes() / n


class FaissSystem:
    def __init__(self, corpus: np.ndarray, threads: int) -> None:
        self.inner = Faiss(corpus, threads)
        self.name = "faiss_hnsw_M16"

    def build(self, corpus: np.ndarray) -> None:
        for start in range(0, len(corpus), 10_000):
            self.inner.add(start, min(len(corpus), start + 10_000))

    def set_ef(self, ef: int) -> None:
        self.inner.index.hnsw.efSearch = ef

    def batch(self, queries: np.ndarray) -> np.ndarray:
        return self.inner.batch(queries)

    def one(self, query: np.ndarray) -> None:
        self.inner.one(query)

    def bytes_per_vector(self, n: int) -> float:
        return float(self.inner.sizes(n)["bytes_per_vector"])


def sweep(system: Any, queries: np.ndarray, truth: np.ndarray, target: float) -> tuple[int, list[dict]]:
    points = []
    for ef in EFS:
        system.set_ef(ef)
        r = recall(system.batch(queries), truth)
        points.append({"ef": ef, "recall@10": round(r, 4)})
        log(f"  {system.name}: ef {ef} recall@10 {r:.4f}")
        if r >= target:
            return ef, points
    return EFS[-1], points


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="storage:M of VectorIndex"
    )
    args = parser.parse_args()
    started = time.monotonic()
    threads = args.threads or available_cores()
    corpus = synthetic(args.size)
    queries = synthetic_queries(args.size, args.queries)
    truth = exact_topk(corpus, queries)
    systems: list[Any] = []
    results: dict[str, dict[str, Any]] = {}

    def save() -> None:
        write_result(
            "ann_tune",
            {
                "settings": {
                    "vectors": args.size,
                    "queries": args.queries,
                    "target_recall@10": args.target,
                    "ef_construction": EF_CONSTRUCTION,
                    "threads": threads,
                    "generator": "bench/ann.py synthetic mixture-v1, seed 0",
                },
                "systems": results,
            },
            command=command_line("bench/ann_tune.py", sys.argv[1:]),
            quick=False,
            started=started,
        )

    candidates: list[Any] = [FaissSystem(corpus, threads)]
    for config in args.configs:
        storage, _, m = config.partition(":")
        candidates.append(Sieve(storage, int(m or 16), threads))
    for system in candidates:
        gc.collect()
        rss = rss_bytes()
        t = time.perf_counter()
        system.build(corpus)
        build_s = time.perf_counter() - t
        growth = (rss_bytes() - rss) / args.size
        log(f"{system.name}: built in {build_s:.0f} s; ef sweep to recall@10 >= {args.target}")
        ef, points = sweep(system, queries, truth, args.target)
        system.set_ef(ef)
        results[system.name] = {
            "build_s": round(build_s, 1),
            "ef": ef,
            "sweep": points,
            "recall@10": points[-1]["recall@10"],
            "bytes_per_vector": round(system.bytes_per_vector(args.size), 1),
            "rss_bytes_per_vector": round(growth, 1),
        }
        systems.append(system)
        save()

    log(f"batch QPS at each system's ef, {args.rounds} rounds, systems in turn")
    qps: dict[str, list[float]] = {s.name: [] for s in systems}
    for r in range(args.rounds):
        for s in systems[r % len(systems) :] + systems[: r % len(systems)]:
            t = time.perf_counter()
            s.batch(queries)
            qps[s.name].append(len(queries) / (time.perf_counter() - t))
    ms: dict[str, list[float]] = {s.name: [] for s in systems}
    with _single_threaded():
        for i, q in enumerate(queries[: args.latency_queries]):
            for s in systems[i % len(systems) :] + systems[: i % len(systems)]:
                t = time.perf_counter()
                s.one(q)
                ms[s.name].append((time.perf_counter() - t) * 1000)
    faiss_qps = np.asarray(qps["faiss_hnsw_M16"])
    for s in systems:
        entry = results[s.name]
        entry["qps"] = round(float(np.median(qps[s.name])), 1)
        entry["qps_rounds"] = [round(x, 1) for x in qps[s.name]]
        entry["qps_over_faiss"] = round(float(np.median(np.asarray(qps[s.name]) / faiss_qps)), 3)
        entry["latency"] = percentiles(ms[s.name])
        log(
            f"  {s.name:18s} ef {entry['ef']:4d} recall@10 {entry['recall@10']:.4f} QPS {entry['qps']:7.0f} "
            f"(x{entry['qps_over_faiss']:.2f} FAISS) p50 {entry['latency']['p50_ms']:.2f} ms "
            f"{entry['bytes_per_vector']:.0f} B/vector serialized, {entry['rss_bytes_per_vector']:.0f} resident"
        )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
