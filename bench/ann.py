"""ANN peers: usearch (Sieve's index) vs FAISS HNSW vs exact search, on identical vectors and queries.

    .venv/bin/python bench/ann.py [--beir ../shared/datasets/scifact] [--quick] [--sizes 100000 1000000]
        [--queries 1000] [--threads N] [--rounds 3] [--ip-up-to 100000]

Data sets:
  - the BEIR corpus embedded by all-MiniLM-L6-v2 (bench/.cache/embeddings-<name>.npz, written by the service
    section from the server's own index snapshot; embedded here if it is missing) with its test queries;
  - synthetic corpora of 384-d vectors from numpy with a fixed seed (`synthetic`): a mixture of one
    cluster per 1,000 vectors whose members spread in a 48-dimensional subspace plus a little isotropic
    noise, L2-normalised, so that neighbours are meaningful (isotropic Gaussian vectors have none) and
    recall is not trivially 1; queries are fresh draws from the same mixture, not corpus points.

Systems, all with Sieve's default settings (SIEVE_HNSW_CONNECTIVITY, SIEVE_HNSW_EF_CONSTRUCTION,
SIEVE_DEFAULT_EF_SEARCH: 32, 200 and 128 since the defaults were chosen with bench/ann_tune.py; results written
before that record M 16 and ef 256), f32 vectors:
  usearch cos   what a collection built before the f16 layout (MetricKind.Cos, f32)
  usearch ip    the same on inner product (the vectors are normalised, so the same ranking): shows what
                the cosine metric costs; not what Sieve runs today
  faiss hnsw    IndexHNSWFlat(d, M, METRIC_INNER_PRODUCT), the same efConstruction and efSearch (FAISS's
                level 0 has 2*M links, as usearch's does)
  sieve <layout> the server's own VectorIndex with its default settings and layout (SIEVE_INDEX_STORAGE,
                i8: int8 under the cosine kernel, each vector scaled to the full int8 range): what a
                collection builds now
  exact         numpy float32 matmul (BLAS) + argpartition: the ground truth and the brute-force baseline

All at one ef here; bench/ann_tune.py chooses ef per system for a recall target (the index's acceptance).

Side by side: the machine is shared and its load changes by the minute, so the systems take turns
rather than running one after the other. The HNSW indexes are built together, slice by slice (about 5% of
the corpus per `add` call, the systems in turn, the first of each slice rotating); a build's time is the
sum of its slices, and the progress and rate of each are logged (a 1M build takes most of an hour here).
Batch search runs --rounds rounds over all queries, the systems in turn (QPS: the median round); the
one-query latencies alternate system by system on each query. The paired ratios usearch cos / FAISS
(median over slices, rounds or queries) are recorded beside the figures.

Figures: build time (both HNSW libraries build with the same thread count, --threads, default all cores:
FAISS through OpenMP's omp_set_num_threads, usearch through each add/search call's `threads`; the result's
settings say which each side used), batch QPS over all queries with the same thread count, single-query latency p50/p99 (one thread, one
query per call, as a server request does), recall@10 against the exact top 10, and bytes per vector:
serialized index / vectors, and memory: the process's resident set growth over the build (the same
measure for both libraries; it reads low on small corpora, where freed memory is reused; usearch also
reports its own `memory_usage`, which counts reserved capacity). The usearch cos index of every
synthetic corpus is saved in bench/.cache/ann/ for the corpus-scaling section.

At 1M vectors (full mode) expect one to three hours on 2 busy cores and about 8 GB of memory at the
peak (corpus 1.5 GB, two indexes of about 2 GB each, the exact search's blocks); the usearch ip variant
(another build, not what Sieve runs) is measured only up to --ip-up-to vectors (default 100k).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# onnxruntime before usearch: the other order segfaults here (see server/storage/index.py).
import onnxruntime  # noqa: F401, I001
from run import CACHE, available_cores, command_line, log, percentiles, write_result
from usearch.index import Index, MetricKind  # noqa: I001

from sieve_core.config import load_settings

DIMS = 384
_DEFAULTS = load_settings({})  # the server's defaults, not this shell's SIEVE_* variables
CONNECTIVITY = _DEFAULTS.hnsw_connectivity
EF_CONSTRUCTION = _DEFAULTS.hnsw_ef_construction
EF_SEARCH = _DEFAULTS.default_ef_search
K = 10
GENERATOR = "mixture-v1"  # bump when `synthetic` changes: cached indexes are keyed by it
CHUNK = 100_000
BUILD_SLICES = 20  # progress reports per HNSW build


# -- synthetic vectors ---------------------------------------------------------------------------------


def _mixture(n_total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, n_total])
    k = max(10, n_total // 1000)
    centers = rng.standard_normal((k, DIMS)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rank = 48
    basis = (rng.standard_normal((rank, DIMS)) / np.sqrt(rank)).astype(np.float32)
    return centers, basis


def _draw(centers: np.ndarray, basis: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    labels = rng.integers(0, len(centers), n)
    x = centers[labels]
    x += 0.35 * (rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis)
    x += 0.02 * rng.standard_normal((n, DIMS), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    """n normalised 384-d vectors, the same for the same (n, seed) on any machine numpy runs on."""
    centers, basis = _mixture(n, seed)
    out = np.empty((n, DIMS), dtype=np.float32)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        out[start:stop] = _draw(centers, basis, stop - start, np.random.default_rng([seed, n, start]))
    return out


def synthetic_queries(n: int, count: int, seed: int = 0) -> np.ndarray:
    """Fresh draws from the mixture of `synthetic(n, seed)`."""
    centers, basis = _mixture(n, seed)
    return _draw(centers, basis, count, np.random.default_rng([seed, n, 1 << 40]))


def usearch_cache_path(n: int, seed: int = 0) -> Path:
    return CACHE / "ann" / f"usearch-cos-{GENERATOR}-{n}-s{seed}-M{CONNECTIVITY}-ef{EF_CONSTRUCTION}.usearch"


# -- systems -------------------------------------------------------------------------------------------


def exact_topk(corpus: np.ndarray, queries: np.ndarray, k: int = K, block: int = 64) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        sims = queries[start : start + block] @ corpus.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start : start + block] = np.take_along_axis(top, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean(
            [
                len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t)
                for f, t in zip(found, truth, strict=True)
            ]
        )
    )


def rss_bytes() -> int:
    """The process's resident set now (not the peak): what an index that was just built occupies."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """BLAS and OpenMP (FAISS) at one thread: one query per call on one thread, as a server request runs."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


class System:
    """One contender: built slice by slice, searched in batches and one query at a time."""

    name = ""
    hnsw = True

    def __init__(self) -> None:
        self.slices_s: list[float] = []
        self.rss_growth = 0

    def add(self, start: int, stop: int) -> None:
        raise NotImplementedError

    def batch(self, queries: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def one(self, query: np.ndarray) -> None:
        raise NotImplementedError

    def sizes(self, n: int) -> dict[str, Any]:
        raise NotImplementedError


class Exact(System):
    name, hnsw = "exact", False

    def __init__(self, corpus: np.ndarray) -> None:
        super().__init__()
        self.corpus = corpus

    def batch(self, queries: np.ndarray) -> np.ndarray:
        return exact_topk(self.corpus, queries)

    def one(self, query: np.ndarray) -> None:
        exact_topk(self.corpus, query[None], block=1)

    def sizes(self, n: int) -> dict[str, Any]:
        return {
            "bytes_per_vector": self.corpus.itemsize * self.corpus.shape[1],
            "note": "float32 matrix; BLAS matmul + argpartition",
        }


class Usearch(System):
    def __init__(self, corpus: np.ndarray, metric: MetricKind, threads: int) -> None:
        super().__init__()
        self.name = f"usearch_{metric.name.lower()}"
        self.corpus, self.threads = corpus, threads
        self.keys = np.arange(len(corpus), dtype=np.uint64)
        self.index = Index(
            ndim=corpus.shape[1],
            metric=metric,
            dtype="f32",
            connectivity=CONNECTIVITY,
            expansion_add=EF_CONSTRUCTION,
            expansion_search=EF_SEARCH,
        )

    def add(self, start: int, stop: int) -> None:
        self.index.add(self.keys[start:stop], self.corpus[start:stop], threads=self.threads)

    def batch(self, queries: np.ndarray) -> np.ndarray:
        return np.asarray(self.index.search(queries, K, threads=self.threads).keys, dtype=np.int64)

    def one(self, query: np.ndarray) -> None:
        self.index.search(query, K, threads=1)

    def sizes(self, n: int) -> dict[str, Any]:
        return {
            "bytes_per_vector": int(self.index.serialized_length) / n,  # not len(save()): a second copy
            "memory_bytes_per_vector": self.index.memory_usage / n,
        }


class SieveDefault(System):
    """The server's own VectorIndex with the server's default settings (layout SIEVE_INDEX_STORAGE): what a
    collection builds today."""

    def __init__(self, corpus: np.ndarray, threads: int) -> None:
        from server.storage.index import VectorIndex

        super().__init__()
        self.corpus, self.threads = corpus, threads
        self.name = f"sieve_{_DEFAULTS.index_storage}"
        self.keys = np.arange(len(corpus), dtype=np.uint64)
        self.index = VectorIndex(
            corpus.shape[1],
            "cosine",
            connectivity=CONNECTIVITY,
            ef_construction=EF_CONSTRUCTION,
            ef_search=EF_SEARCH,
            storage=_DEFAULTS.index_storage,
        )

    def add(self, start: int, stop: int) -> None:
        self.index.add(self.keys[start:stop], self.corpus[start:stop], threads=self.threads)

    def batch(self, queries: np.ndarray) -> np.ndarray:
        return self.index.search_batch(queries, K, threads=self.threads).astype(np.int64)

    def one(self, query: np.ndarray) -> None:
        self.index.search(query, K)

    def sizes(self, n: int) -> dict[str, Any]:
        return {"bytes_per_vector": self.index.memory_bytes() / n}


class Faiss(System):
    name = "faiss_hnsw"

    def __init__(self, corpus: np.ndarray, threads: int, connectivity: int = CONNECTIVITY) -> None:
        import faiss

        super().__init__()
        self.faiss, self.corpus, self.threads = faiss, corpus, threads
        faiss.omp_set_num_threads(threads)
        self.index = faiss.IndexHNSWFlat(corpus.shape[1], connectivity, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.hnsw.efSearch = EF_SEARCH

    def add(self, start: int, stop: int) -> None:
        self.faiss.omp_set_num_threads(self.threads)
        self.index.add(self.corpus[start:stop])

    def batch(self, queries: np.ndarray) -> np.ndarray:
        self.faiss.omp_set_num_threads(self.threads)
        return self.index.search(queries, K)[1]

    def one(self, query: np.ndarray) -> None:
        self.faiss.omp_set_num_threads(1)
        self.index.search(query[None], K)

    def sizes(self, n: int) -> dict[str, Any]:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:  # a file, not a second copy in memory
            path = os.path.join(tmp, "index.faiss")
            self.faiss.write_index(self.index, path)
            return {"bytes_per_vector": os.path.getsize(path) / n}


def build_interleaved(label: str, systems: list[System], n: int, load: list[float] | None = None) -> None:
    """Adds [0, n) to every HNSW system in BUILD_SLICES slices, the systems taking turns slice by slice (the
    first of each slice rotating), so that a change in the machine's load hits them alike; logs progress
    (a 1M build takes most of an hour here). Each system's time and resident-set growth is the sum over
    its slices."""
    step = max(10_000, -(-n // BUILD_SLICES))
    hnsw = [s for s in systems if s.hnsw]
    for i, start in enumerate(range(0, n, step)):
        stop = min(n, start + step)
        for s in hnsw[i % len(hnsw) :] + hnsw[: i % len(hnsw)]:
            rss = rss_bytes()
            t = time.perf_counter()
            s.add(start, stop)
            s.slices_s.append(time.perf_counter() - t)
            s.rss_growth += rss_bytes() - rss
        if load is not None:
            load.append(os.getloadavg()[0])
        if n > step:
            done = ", ".join(
                f"{s.name} {sum(s.slices_s) / 60:.1f} min ({(stop - start) / s.slices_s[-1]:,.0f}/s now)"
                for s in hnsw
            )
            log(f"  {label}: {stop:,}/{n:,} vectors ({100 * stop / n:.0f}%) built; {done}")


def build_usearch(corpus: np.ndarray, metric: MetricKind, threads: int) -> tuple[Index, float]:
    """Sieve's index alone (bench/scaling.py, when bench/ann.py left none in the cache)."""
    system = Usearch(corpus, metric, threads)
    build_interleaved(system.name, [system], len(corpus))
    return system.index, sum(system.slices_s)


def _rotate(items: list[System], i: int) -> list[System]:
    return items[i % len(items) :] + items[: i % len(items)]


def compare(
    name: str,
    corpus: np.ndarray,
    queries: np.ndarray,
    threads: int,
    latency_queries: int,
    rounds: int,
    save: bool,
    ip: bool = True,
) -> dict[str, Any]:
    n = len(corpus)
    log(f"{name}: {n:,} x {corpus.shape[1]} vectors, {len(queries)} queries; exact ground truth")
    truth = exact_topk(corpus, queries)
    gc.collect()
    systems: list[System] = [Exact(corpus), Usearch(corpus, MetricKind.Cos, threads)]
    if ip:
        systems.append(Usearch(corpus, MetricKind.IP, threads))
    systems.append(SieveDefault(corpus, threads))
    systems.append(Faiss(corpus, threads))
    log(f"{name}: building {', '.join(s.name for s in systems if s.hnsw)}, slice by slice in turn")
    load = [os.getloadavg()[0]]  # the shared machine's load while this data set was measured
    build_interleaved(name, systems, n, load)

    log(
        f"{name}: batch search, {rounds} rounds of {len(queries)} queries, systems in turn; {threads} threads each "
        f"(FAISS: OpenMP {threads}; usearch: threads={threads}; exact: numpy's BLAS)"
    )
    qps: dict[str, list[float]] = {s.name: [] for s in systems}
    found: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for s in _rotate(systems, r):
            t = time.perf_counter()
            keys = s.batch(queries)
            qps[s.name].append(len(queries) / (time.perf_counter() - t))
            found.setdefault(s.name, keys)

    log(
        f"{name}: one query per call, {latency_queries} queries (exact: {min(latency_queries, 100)}), in turn"
    )
    ms: dict[str, list[float]] = {s.name: [] for s in systems}
    with _single_threaded():
        for s in systems:  # warm caches
            for q in queries[:5]:
                s.one(q)
        for i, q in enumerate(queries[:latency_queries]):
            for s in _rotate(systems, i):
                if s.hnsw or i < 100:  # exact at 1M is ~0.1 s a query on one thread
                    t = time.perf_counter()
                    s.one(q)
                    ms[s.name].append((time.perf_counter() - t) * 1000)
    load.append(os.getloadavg()[0])

    results: dict[str, Any] = {}
    for s in systems:
        results[s.name] = {
            "build_s": sum(s.slices_s),
            "qps": float(np.median(qps[s.name])),
            "qps_rounds": [round(x, 1) for x in qps[s.name]],
            "latency": percentiles(ms[s.name]),
            "recall@10": 1.0 if s.name == "exact" else recall(found[s.name], truth),
            **s.sizes(n),
        }
        if s.hnsw:
            results[s.name]["rss_bytes_per_vector"] = s.rss_growth / n
    paired = _paired(systems, qps, ms)
    if save:
        path = usearch_cache_path(n)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        next(s for s in systems if s.name == "usearch_cos").index.save(str(tmp))  # type: ignore[attr-defined]
        tmp.replace(path)
    for system, r in results.items():
        rss = r.get("rss_bytes_per_vector")
        log(
            f"  {system:12s} build {r['build_s']:7.1f} s  QPS {r['qps']:9.0f}  p50 {r['latency']['p50_ms']:.3f} ms  "
            f"recall@10 {r['recall@10']:.4f}  {r['bytes_per_vector']:.0f} B/vector serialized"
            + (f", {rss:.0f} B/vector resident" if rss is not None else "")
        )
    log(f"  paired (usearch cos / faiss): {paired}")
    return {
        "name": name,
        "vectors": n,
        "dims": int(corpus.shape[1]),
        "queries": len(queries),
        "rounds": rounds,
        "load_average_1min": {"min": min(load), "median": float(np.median(load)), "max": max(load)},
        "systems": results,
        "paired": paired,
    }


def _paired(
    systems: list[System], qps: dict[str, list[float]], ms: dict[str, list[float]]
) -> dict[str, float]:
    """usearch cos / FAISS, each from figures taken side by side: the median over build slices of the
    per-slice time ratio, over rounds of the QPS ratio, over queries of the one-query latency ratio."""
    by = {s.name: s for s in systems}
    u, f = by["usearch_cos"], by["faiss_hnsw"]
    return {
        "build_time_usearch_cos_over_faiss": round(float(np.median(np.divide(u.slices_s, f.slices_s))), 3),
        "qps_usearch_cos_over_faiss": round(float(np.median(np.divide(qps[u.name], qps[f.name]))), 3),
        "latency_usearch_cos_over_faiss": round(float(np.median(np.divide(ms[u.name], ms[f.name]))), 3),
        "qps_usearch_cos_over_exact": round(float(np.median(np.divide(qps[u.name], qps["exact"]))), 3),
        **{
            f"qps_{s.name}_over_faiss": round(float(np.median(np.divide(qps[s.name], qps[f.name]))), 3)
            for s in systems
            if isinstance(s, SieveDefault)
        },
    }


def beir_embeddings(beir: Path, quick: bool) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(document vectors, test query vectors, note) from the service section's file, else embedded here
    (not in quick mode: that takes minutes)."""
    if not (beir / "corpus.jsonl").is_file():
        return None
    path = CACHE / f"embeddings-{beir.name}.npz"
    if path.is_file():
        data = np.load(path)
        note = str(data["note"]) if "note" in data else ""
        return data["documents"].astype(np.float32), data["queries"].astype(np.float32), note
    if quick:
        log(f"{path} is missing (the service section writes it): {beir.name} skipped in quick mode")
        return None
    log(f"{path} is missing (the service section writes it): embedding {beir} here, which takes minutes")
    from sieve_core.beir import load_beir
    from sieve_core.models.bi_encoder import BiEncoderRunner

    root = Path(__file__).resolve().parent.parent
    runner = BiEncoderRunner(root / "models" / "all-MiniLM-L6-v2")
    data = load_beir(beir)
    docs = runner.embed(list(data.corpus.values()))
    queries = runner.embed(list(data.queries.values()))
    note = f"embedded by bench/ann.py: all {len(docs)} documents"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, documents=docs, queries=queries, note=note)
    return docs, queries, note


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--beir", type=Path, help="BEIR folder whose embeddings to index (optional)")
    parser.add_argument(
        "--quick", action="store_true", help="synthetic 10k only, no usearch ip variant, fewer queries"
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="synthetic corpus sizes (default 100k and 1M)")
    parser.add_argument("--queries", type=int, help="synthetic queries (default 1000, quick 500)")
    parser.add_argument(
        "--threads", type=int, default=0, help="build and batch-search threads (0: all cores)"
    )
    parser.add_argument("--rounds", type=int, help="batch-search rounds per system (default 3, quick 2)")
    parser.add_argument(
        "--ip-up-to",
        type=int,
        default=100_000,
        help="measure the usearch ip variant (one more build) only on corpora up to this size (default 100k)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    threads = args.threads or available_cores()
    sizes = args.sizes or ([10_000] if args.quick else [100_000, 1_000_000])
    n_queries = args.queries or (300 if args.quick else 1000)
    latency_queries = 100 if args.quick else 500
    rounds = args.rounds or (2 if args.quick else 3)
    argv = ["--quick"] if args.quick else []
    if args.beir:
        argv += ["--beir", str(args.beir)]
    if args.sizes:
        argv += ["--sizes", *map(str, args.sizes)]
    if args.queries:
        argv += ["--queries", str(args.queries)]
    if args.rounds:
        argv += ["--rounds", str(args.rounds)]
    if args.ip_up_to != 100_000:
        argv += ["--ip-up-to", str(args.ip_up_to)]

    datasets: list[dict[str, Any]] = []

    def save() -> None:  # after every data set: a run stopped for time keeps what it has measured
        write_result(
            "ann",
            {
                "settings": {
                    "connectivity": CONNECTIVITY,
                    "ef_construction": EF_CONSTRUCTION,
                    "ef_search": EF_SEARCH,
                    "k": K,
                    "threads": threads,
                    "threads_per_side": {
                        "faiss": f"{threads} (OpenMP, omp_set_num_threads) for build and batch search",
                        "usearch": f"{threads} (threads= of each add / search call) for build and batch search",
                        "exact": "numpy's BLAS threads (its default) for batch search",
                    },
                    "latency": "one query per call, one thread (usearch threads=1, faiss omp 1, BLAS 1 thread)",
                    "side_by_side": "HNSW builds in turn slice by slice; batch rounds and one-query calls in turn",
                },
                "datasets": datasets,
            },
            command=command_line("bench/ann.py", argv),
            quick=args.quick,
            started=started,
        )

    real = beir_embeddings(args.beir, args.quick) if args.beir else None
    if real is not None:
        docs, queries, note = real
        entry = compare(
            f"{args.beir.name} (all-MiniLM-L6-v2)",
            docs,
            queries,
            threads,
            latency_queries,
            rounds,
            False,
        )
        entry["note"] = note
        datasets.append(entry)
        save()
    for n in sizes:
        log(f"generating {n:,} synthetic vectors")
        corpus = synthetic(n)
        queries = synthetic_queries(n, n_queries)
        ip = not args.quick and n <= args.ip_up_to
        entry = compare(f"synthetic {n:,}", corpus, queries, threads, latency_queries, rounds, True, ip)
        entry["note"] = f"generator {GENERATOR}, seed 0"
        datasets.append(entry)
        del corpus
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
