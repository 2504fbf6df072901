"""Choosing the vector index's settings by measurement: index layouts and connectivity vs FAISS HNSW, each at
the smallest ef that reaches a recall target.

    .venv/bin/python bench/ann_tune.py [--size 100000] [--queries 1000] [--target 0.95] [--threads N]
        [--configs i8:16 f16:16 i8:32:400 ...] [--faiss-m 16 ...] [--rounds 5] [--result NAME]

Data: bench/ann.py's synthetic mixture (384-d, normalised, one cluster per 1,000 vectors, seed 0) and fresh
queries from it; ground truth by exact float32 search.

Systems: the server's own VectorIndex (server/storage/index.py) in each layout asked for (`i8`, the default:
int8 under the cosine kernel, each vector scaled so that its largest component is 127; `f16`: cosine as inner
product on normalised f16 vectors; `f32`: the same in f32), with connectivity M; and FAISS IndexHNSWFlat (M from
--faiss-m, default 16 as in the issue's table; inner product, f32), the first of which every ratio is
against. ef_construction is the server's (200) unless a config names another (storage:M:ef_construction).

Threads, the same for both sides: --threads (default: all cores) for builds and batch search; FAISS through
OpenMP (omp_set_num_threads), usearch through the `threads` argument of each add/search call. The one-thread
figures (batch at one thread, CPU time and distances per query, one-query latency) take threading and the
machine's other load out of the comparison as far as a shared machine allows.

Per system: ef sweep (recall@10 over all queries, batch search) from small to large, stopping at the first
ef whose recall reaches --target; then, at that ef and with the systems taking turns round by round: batch
QPS at --threads and at one thread (--rounds rounds over all queries; median round, and the median of the
per-round ratios to FAISS), CPU time per query (process time of the one-thread rounds) and distances computed
per query (usearch's computed_distances, FAISS's hnsw_stats.ndis), one-query latency (one thread, systems in
turn per query), and memory per vector: the serialized index (usearch serialized_length, FAISS write_index
size; both hold the vectors and the graph) and the process's resident growth over the build. The 1-minute
load average is recorded at each step. Writes bench/results/ann_tune.json.
"""

from __future__ import annotations

import argparse
import gc
import os
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
from sieve_core.config import load_settings

_DEFAULTS = load_settings({})  # the server's defaults, not this shell's SIEVE_* variables

K = 10
EFS = (
    16,
    24,
    32,
    48,
    64,
    80,
    96,
    112,
    128,
    144,
    160,
    176,
    192,
    208,
    224,
    240,
    256,
    288,
    320,
    384,
    512,
    768,
    1024,
)
DEFAULT_CONFIGS = ("i8:16", "f16:16")


class Sieve:
    """The server's VectorIndex in one layout and connectivity."""

    def __init__(
        self, storage: str, connectivity: int, threads: int, ef_construction: int = EF_CONSTRUCTION
    ) -> None:
        self.name = f"sieve_{storage}_M{connectivity}"
        if ef_construction != EF_CONSTRUCTION:
            self.name += f"_efc{ef_construction}"
        elif (storage, connectivity) == (_DEFAULTS.index_storage, _DEFAULTS.hnsw_connectivity):
            self.name += "_default"
        self.threads = threads
        self.index = VectorIndex(
            384,
            "cosine",
            connectivity=connectivity,
            ef_construction=ef_construction,
            ef_search=64,
            storage=storage,
        )

    def build(self, corpus: np.ndarray) -> None:
        keys = np.arange(len(corpus), dtype=np.uint64)
        step = 10_000
        for start in range(0, len(corpus), step):
            self.index.add(keys[start : start + step], corpus[start : start + step], threads=self.threads)

    def set_ef(self, ef: int) -> None:
        self.index.default_ef = ef
        self.index._index.expansion_search = ef  # type: ignore[misc]

    def batch(self, queries: np.ndarray) -> np.ndarray:
        return self.index.search_batch(queries, K, threads=self.threads).astype(np.int64)

    def batch_one_thread(self, queries: np.ndarray) -> int:
        """One-thread batch search through the same preparation as search_batch; the distances usearch computed."""
        found = self.index._index.search(self.index.layout.prepare(queries), K, threads=1)
        return int(found.computed_distances)

    def one(self, query: np.ndarray) -> None:
        self.index.search(query, K)

    def bytes_per_vector(self, n: int) -> float:
        return self.index.memory_bytes() / n


class FaissSystem:
    def __init__(self, corpus: np.ndarray, threads: int, connectivity: int) -> None:
        self.name = f"faiss_hnsw_M{connectivity}"
        self.inner = Faiss(corpus, threads, connectivity)

    def build(self, corpus: np.ndarray) -> None:
        for start in range(0, len(corpus), 10_000):
            self.inner.add(start, min(len(corpus), start + 10_000))

    def set_ef(self, ef: int) -> None:
        self.inner.index.hnsw.efSearch = ef

    def batch(self, queries: np.ndarray) -> np.ndarray:
        return self.inner.batch(queries)

    def batch_one_thread(self, queries: np.ndarray) -> int:
        """One OpenMP thread; the distances FAISS computed (its HNSW statistics)."""
        stats = self.inner.faiss.cvar.hnsw_stats
        stats.reset()
        self.inner.faiss.omp_set_num_threads(1)
        self.inner.index.search(queries, K)
        return int(stats.ndis)

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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help="storage:M[:ef_construction] of VectorIndex (ef_construction: the server's by default)",
    )
    parser.add_argument(
        "--result", default="ann_tune", help="bench/results/<RESULT>.json (default: ann_tune)"
    )
    parser.add_argument(
        "--faiss-m",
        type=int,
        nargs="+",
        default=[16],
        help="FAISS HNSW connectivities; the first (default 16, the issue's peer) is what ratios are against",
    )
    args = parser.parse_args()
    started = time.monotonic()
    threads = args.threads or available_cores()
    corpus = synthetic(args.size)
    queries = synthetic_queries(args.size, args.queries)
    truth = exact_topk(corpus, queries)
    systems: list[Any] = []
    results: dict[str, dict[str, Any]] = {}
    load = [os.getloadavg()[0]]

    def save() -> None:
        write_result(
            args.result,
            {
                "settings": {
                    "vectors": args.size,
                    "queries": args.queries,
                    "target_recall@10": args.target,
                    "ef_construction": EF_CONSTRUCTION,
                    "threads": threads,
                    "threads_per_side": {
                        "faiss": f"{threads} (OpenMP, omp_set_num_threads) for build and batch search; 1 for one query",
                        "usearch": f"{threads} (threads= of each add / search call) for build and batch search; 1 for "
                        "one query",
                    },
                    "load_average_1min": {
                        "min": min(load),
                        "median": float(np.median(load)),
                        "max": max(load),
                    },
                    "generator": "bench/ann.py synthetic mixture-v1, seed 0",
                },
                "systems": results,
            },
            command=command_line("bench/ann_tune.py", sys.argv[1:]),
            quick=False,
            started=started,
        )

    candidates: list[Any] = [FaissSystem(corpus, threads, m) for m in args.faiss_m]
    reference = candidates[0].name
    for config in args.configs:
        storage, m, efc = (config.split(":") + ["", ""])[:3]
        candidates.append(Sieve(storage, int(m or 16), threads, int(efc or EF_CONSTRUCTION)))
    for system in candidates:
        gc.collect()
        rss = rss_bytes()
        t = time.perf_counter()
        system.build(corpus)
        build_s = time.perf_counter() - t
        growth = (rss_bytes() - rss) / args.size
        load.append(os.getloadavg()[0])
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

    log(
        f"at each system's ef, systems in turn, {args.rounds} rounds: batch QPS at {threads} threads "
        f"(FAISS: OpenMP {threads} threads; usearch: threads={threads}) and at 1 thread (CPU time, distances)"
    )
    turns = {name: {"qps": [], "qps_1t": [], "cpu_ms": [], "distances": []} for name in results}
    for r in range(args.rounds):
        for s in systems[r % len(systems) :] + systems[: r % len(systems)]:
            t = time.perf_counter()
            s.batch(queries)
            turns[s.name]["qps"].append(len(queries) / (time.perf_counter() - t))
            t, cpu = time.perf_counter(), time.process_time()
            distances = s.batch_one_thread(queries)
            turns[s.name]["qps_1t"].append(len(queries) / (time.perf_counter() - t))
            turns[s.name]["cpu_ms"].append((time.process_time() - cpu) * 1000 / len(queries))
            turns[s.name]["distances"].append(distances / len(queries))
        load.append(os.getloadavg()[0])
    ms: dict[str, list[float]] = {s.name: [] for s in systems}
    with _single_threaded():
        for i, q in enumerate(queries[: args.latency_queries]):
            for s in systems[i % len(systems) :] + systems[: i % len(systems)]:
                t = time.perf_counter()
                s.one(q)
                ms[s.name].append((time.perf_counter() - t) * 1000)
    load.append(os.getloadavg()[0])
    faiss = turns[reference]
    for s in systems:
        entry, mine = results[s.name], turns[s.name]
        for key in ("qps", "qps_1t"):
            entry[key] = round(float(np.median(mine[key])), 1)
            entry[f"{key}_rounds"] = [round(x, 1) for x in mine[key]]
            entry[f"{key}_over_faiss"] = round(float(np.median(np.divide(mine[key], faiss[key]))), 3)
        entry["cpu_ms_per_query"] = round(float(np.median(mine["cpu_ms"])), 3)
        entry["cpu_over_faiss"] = round(float(np.median(np.divide(mine["cpu_ms"], faiss["cpu_ms"]))), 3)
        entry["distances_per_query"] = round(float(np.median(mine["distances"])))
        entry["ns_per_distance"] = round(
            entry["cpu_ms_per_query"] * 1e6 / max(entry["distances_per_query"], 1)
        )
        entry["latency"] = percentiles(ms[s.name])
        log(
            f"  {s.name:18s} ef {entry['ef']:4d} recall@10 {entry['recall@10']:.4f} QPS {entry['qps']:6.0f} "
            f"(x{entry['qps_over_faiss']:.2f} FAISS), 1 thread {entry['qps_1t']:5.0f} "
            f"(x{entry['qps_1t_over_faiss']:.2f}); CPU {entry['cpu_ms_per_query']:.2f} ms/query "
            f"(x{entry['cpu_over_faiss']:.2f}), {entry['distances_per_query']} distances, "
            f"{entry['ns_per_distance']} ns each; p50 {entry['latency']['p50_ms']:.2f} ms; "
            f"{entry['bytes_per_vector']:.0f} B/vector serialized, {entry['rss_bytes_per_vector']:.0f} resident"
        )
    log(
        f"load average (1 min) during the run: {min(load):.1f} to {max(load):.1f}, median {np.median(load):.1f}"
    )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
