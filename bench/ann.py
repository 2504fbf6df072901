"""ANN peers: usearch (Sieve's index) vs FAISS HNSW vs exact search, on identical vectors and queries.

    .venv/bin/python bench/ann.py [--beir ../shared/datasets/scifact] [--quick] [--sizes 100000 1000000]
        [--queries 1000] [--threads N]

Data sets:
  - the BEIR corpus embedded by all-MiniLM-L6-v2 (bench/.cache/embeddings-<name>.npz, written by the service
    section from the server's own index snapshot; embedded here if it is missing) with its test queries;
  - synthetic corpora of 384-d vectors from numpy with a fixed seed (`synthetic`): a mixture of one
    cluster per 1,000 vectors whose members spread in a 48-dimensional subspace plus a little isotropic
    noise, L2-normalised, so that neighbours are meaningful (isotropic Gaussian vectors have none) and
    recall is not trivially 1; queries are fresh draws from the same mixture, not corpus points.

Systems, all with Sieve's settings (SIEVE_HNSW_CONNECTIVITY=16, SIEVE_HNSW_EF_CONSTRUCTION=200,
SIEVE_DEFAULT_EF_SEARCH=256), f32 vectors:
  usearch cos   exactly what a collection builds (server/index.py: MetricKind.Cos)
  usearch ip    the same on inner product (the vectors are normalised, so the same ranking): shows what
                the cosine metric costs; not what Sieve runs today
  faiss hnsw    IndexHNSWFlat(d, M=16, METRIC_INNER_PRODUCT), efConstruction 200, efSearch 256 (FAISS's
                level 0 has 2*M links, as usearch's does)
  exact         numpy float32 matmul (BLAS) + argpartition: the ground truth and the brute-force baseline

Figures: build time (both HNSW libraries build with the same thread count, --threads, default all cores),
batch QPS over all queries with the same thread count, single-query latency p50/p99 (one thread, one
query per call, as a server request does), recall@10 against the exact top 10, and bytes per vector:
serialized index / vectors, and memory: the process's resident set growth over the build (the same
measure for both libraries; usearch also reports its own `memory_usage`, which counts reserved capacity).
Both libraries get the corpus in the same slices of about 5% (one `add` call each), so that a long
build reports its progress and rate; the time is the sum of the slices. The usearch cos index of every
synthetic corpus is saved in bench/.cache/ann/ for the corpus-scaling section.

At 1M vectors (full mode) expect about an hour per HNSW build on 2 busy cores and about 10 GB of memory
at the peak (corpus 1.5 GB, an index about 3 GB, its serialized copy); the usearch ip variant (another
build, not what Sieve runs) is measured only up to --ip-up-to vectors (default 100k).
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

# onnxruntime before usearch: the other order segfaults here (see server/index.py).
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


def _latency(search_one: Any, queries: np.ndarray, count: int) -> dict[str, float]:
    for q in queries[:5]:  # warm caches
        search_one(q)
    ms = []
    for q in queries[:count]:
        t = time.perf_counter()
        search_one(q)
        ms.append((time.perf_counter() - t) * 1000)
    return percentiles(ms)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """One query per call on one thread, like the HNSW latencies (BLAS threads only add hand-offs here)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


def run_exact(
    corpus: np.ndarray, queries: np.ndarray, latency_queries: int
) -> tuple[dict[str, Any], np.ndarray]:
    t = time.perf_counter()
    truth = exact_topk(corpus, queries)
    batch_s = time.perf_counter() - t
    with _one_blas_thread():
        lat = _latency(lambda q: exact_topk(corpus, q[None], block=1), queries, min(latency_queries, 100))
    return {
        "build_s": 0.0,
        "qps": len(queries) / batch_s,
        "latency": lat,
        "recall@10": 1.0,
        "bytes_per_vector": corpus.itemsize * corpus.shape[1],
        "note": "float32 matrix; BLAS matmul + argpartition",
    }, truth


def rss_bytes() -> int:
    """The process's resident set now (not the peak): what an index that was just built occupies."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sliced_add(name: str, n: int, add: Any) -> float:
    """Calls add(start, stop) over [0, n) in BUILD_SLICES slices; logs progress, rate and the time left
    (a 1M build takes most of an hour here). Returns the seconds spent inside add."""
    step = max(10_000, -(-n // BUILD_SLICES))
    spent = 0.0
    for start in range(0, n, step):
        stop = min(n, start + step)
        t = time.perf_counter()
        add(start, stop)
        took = time.perf_counter() - t
        spent += took
        if n > step:
            rate = (stop - start) / took  # the last slice's: insertion slows down as the graph grows
            log(
                f"  {name}: {stop:,}/{n:,} vectors ({100 * stop / n:.0f}%) in {spent / 60:.1f} min, now "
                f"{rate:,.0f} vectors/s, at least {(n - stop) / rate / 60:.1f} min left"
            )
    return spent


def build_usearch(corpus: np.ndarray, metric: MetricKind, threads: int) -> tuple[Index, float]:
    index = Index(
        ndim=corpus.shape[1],
        metric=metric,
        dtype="f32",
        connectivity=CONNECTIVITY,
        expansion_add=EF_CONSTRUCTION,
        expansion_search=EF_SEARCH,
    )
    keys = np.arange(len(corpus), dtype=np.uint64)
    build_s = sliced_add(
        f"usearch {metric.name.lower()}",
        len(corpus),
        lambda a, b: index.add(keys[a:b], corpus[a:b], threads=threads),
    )
    return index, build_s


def run_usearch(
    corpus: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    metric: MetricKind,
    threads: int,
    latency_queries: int,
    save_to: Path | None,
) -> dict[str, Any]:
    gc.collect()
    rss = rss_bytes()
    index, build_s = build_usearch(corpus, metric, threads)
    rss_growth = rss_bytes() - rss
    t = time.perf_counter()
    matches = index.search(queries, K, threads=threads)
    batch_s = time.perf_counter() - t
    found = np.asarray(matches.keys, dtype=np.int64)
    lat = _latency(lambda q: index.search(q, K, threads=1), queries, latency_queries)
    serialized = int(index.serialized_length)  # not len(index.save()): a second copy in memory
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_to.with_suffix(".tmp")
        index.save(str(tmp))
        tmp.replace(save_to)
    return {
        "build_s": build_s,
        "qps": len(queries) / batch_s,
        "latency": lat,
        "recall@10": recall(found, truth),
        "bytes_per_vector": serialized / len(corpus),
        "rss_bytes_per_vector": rss_growth / len(corpus),
        "memory_bytes_per_vector": index.memory_usage / len(corpus),
    }


def run_faiss(
    corpus: np.ndarray, queries: np.ndarray, truth: np.ndarray, threads: int, latency_queries: int
) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(threads)
    gc.collect()
    rss = rss_bytes()
    index = faiss.IndexHNSWFlat(corpus.shape[1], CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.hnsw.efSearch = EF_SEARCH
    build_s = sliced_add("faiss hnsw", len(corpus), lambda a, b: index.add(corpus[a:b]))
    rss_growth = rss_bytes() - rss
    t = time.perf_counter()
    _, found = index.search(queries, K)
    batch_s = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    lat = _latency(lambda q: index.search(q[None], K), queries, latency_queries)
    faiss.omp_set_num_threads(threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:  # a file, not a second copy in memory
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        serialized = os.path.getsize(path)
    return {
        "build_s": build_s,
        "qps": len(queries) / batch_s,
        "latency": lat,
        "recall@10": recall(found, truth),
        "bytes_per_vector": serialized / len(corpus),
        "rss_bytes_per_vector": rss_growth / len(corpus),
    }


def compare(
    name: str,
    corpus: np.ndarray,
    queries: np.ndarray,
    threads: int,
    latency_queries: int,
    save: bool,
    ip: bool = True,
) -> dict[str, Any]:
    log(f"{name}: {len(corpus):,} x {corpus.shape[1]} vectors, {len(queries)} queries; exact")
    systems: dict[str, Any] = {}
    systems["exact"], truth = run_exact(corpus, queries, latency_queries)
    log(f"{name}: usearch cos (Sieve's index) build")
    save_to = usearch_cache_path(len(corpus)) if save else None
    systems["usearch_cos"] = run_usearch(
        corpus, queries, truth, MetricKind.Cos, threads, latency_queries, save_to
    )
    if ip:
        log(f"{name}: usearch ip build")
        systems["usearch_ip"] = run_usearch(
            corpus, queries, truth, MetricKind.IP, threads, latency_queries, None
        )
    log(f"{name}: faiss hnsw build")
    systems["faiss_hnsw"] = run_faiss(corpus, queries, truth, threads, latency_queries)
    for system, r in systems.items():
        rss = r.get("rss_bytes_per_vector")
        log(
            f"  {system:12s} build {r['build_s']:7.1f} s  QPS {r['qps']:9.0f}  p50 {r['latency']['p50_ms']:.3f} ms  "
            f"recall@10 {r['recall@10']:.4f}  {r['bytes_per_vector']:.0f} B/vector serialized"
            + (f", {rss:.0f} B/vector resident" if rss is not None else "")
        )
    return {
        "name": name,
        "vectors": len(corpus),
        "dims": int(corpus.shape[1]),
        "queries": len(queries),
        "systems": systems,
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
    argv = ["--quick"] if args.quick else []
    if args.beir:
        argv += ["--beir", str(args.beir)]
    if args.sizes:
        argv += ["--sizes", *map(str, args.sizes)]
    if args.queries:
        argv += ["--queries", str(args.queries)]
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
                    "latency": "one query per call, one thread (usearch threads=1, faiss omp 1, BLAS 1 thread)",
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
        entry = compare(f"synthetic {n:,}", corpus, queries, threads, latency_queries, True, ip)
        entry["note"] = f"generator {GENERATOR}, seed 0"
        datasets.append(entry)
        del corpus
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
