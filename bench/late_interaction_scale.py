"""Issue 13, item 5: a 1M-document late-interaction collection on one machine, through the server's store.

    .venv/bin/python bench/late_interaction_scale.py --count 1000000 --dir bench/.cache/li-scale
        [--beir ../shared/datasets/scifact] [--batch 1000] [--measure-only]      (or: make bench-li-scale)

Builds a collection in the server's own SQLite store (server.storage.store.Store, the file layout and
pragmas the server uses: WAL, synchronous=FULL, incremental auto-vacuum) whose documents have what a
SciFact document has: a text of SciFact's mean size (1,501 bytes, filler), a 384-d float32 vector, and a
token blob of the collection's default format (int4, pool 2 since the int4 codec; results written before
it say int8, pool 4), written with the document in one
`Store.upsert` transaction per batch, as UpsertDocuments writes them. The token vectors are synthetic
(random unit vectors, see SyntheticBlobs; encoding 1M abstracts would take ~9 hours here): each
document has ceil(n / pool factor) rows where n is drawn from SciFact's real token counts (the bundle's tokenizer
over the corpus, truncated at max_length, without [CLS]/[SEP]), so the blobs have the sizes the default
format gives SciFact.

Records: build time and documents/s; disk per document (database + WAL after a checkpoint) and the mean
token blob; the process's peak RSS per document (the store keeps nothing per document in memory: blobs
are read per query; the OS page cache holds what it can of the file); and late interaction on 100
candidates as the server runs it (`Store.token_blobs` by key, then `maxsim_blobs` against a 24-token
query): for random candidate sets, the first read (the store's files evicted from the page cache before
the measurement) and the same set again (warm), p50/p90. Writes bench/results/late_interaction_scale.json (counts under 1M: bench/results/quick/).

Refuses to start when the disk under --dir has less free space than the estimate plus 10 %, or when --dir
already holds a store (use --measure-only to re-measure it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

# One BLAS thread, as the server's executor should run MaxSim on the shared cores (late_interaction.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from run import DEFAULT_BEIR, QUICK_RESULTS, RESULTS, ROOT, command_line, log, percentiles, write_result  # noqa: E402

import server.storage.store as store_module  # noqa: E402
from server.storage.store import SqliteStore, Store  # noqa: E402
from sieve_core.late_interaction import maxsim_blobs  # noqa: E402
from sieve_core.token_codec import HEADER_BYTES, bytes_per_token, decode_tokens, encode_tokens  # noqa: E402
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, check_blob  # noqa: E402
from sieve_core.types import Document  # noqa: E402

DIMS = 384
TEXT_BYTES = 1501  # SciFact's mean title + " " + text, UTF-8 bytes
QUERY_TOKENS = 24
CANDIDATES = 100
DB_NAME = "sieve.db"  # as the server names its store (server/core/engine.py)
ROW_OVERHEAD = 300  # SQLite rows, keys and indexes per document, estimated (measured figure is recorded)
MODEL_ID = "all-MiniLM-L6-v2@synthetic"


def scifact_token_counts(beir: Path, bundle: Path) -> np.ndarray | None:
    """Token counts of SciFact's documents as the bi-encoder sees them (truncated, no [CLS]/[SEP])."""
    if not (beir / "corpus.jsonl").is_file() or not (bundle / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    max_length = int(json.loads((bundle / "manifest.json").read_text())["max_length"])
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    texts = []
    with (beir / "corpus.jsonl").open() as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                texts.append(f"{d.get('title', '')} {d.get('text', '')}".strip())
    return np.array([len(e.ids) - 2 for e in tokenizer.encode_batch(texts)], dtype=np.int64)


def pooled_rows(counts: np.ndarray | None, rng: np.random.Generator, n: int) -> np.ndarray:
    if counts is None:  # no data set: SciFact's mean with some spread
        tokens = np.clip(rng.normal(238, 30, n).round(), 8, 254).astype(np.int64)
    else:
        tokens = rng.choice(counts, n)
    return np.maximum(1, -(-tokens // DEFAULT_TOKEN_FORMAT.pool_factor))


class SyntheticBlobs:
    """Token blobs of random unit rows in the default format, cheap enough for 1M documents.

    A pool of POOL_ROWS random unit rows goes through the codec (`encode_tokens`) once; a document of n
    rows is then n consecutive rows of the pool from a random offset, behind the header the codec writes
    for n such rows (it depends on n only). So every blob is exactly what `compress` stores for n pooled
    unit rows, at the cost of a copy: drawing and encoding fresh rows took 1.9 ms per document here
    (32 minutes per million). Documents share rows of the pool, which matters to nothing measured (SQLite
    does not compress; MaxSim costs the same whatever the values).
    """

    POOL_ROWS = 1 << 16

    def __init__(self, rng: np.random.Generator) -> None:
        rows = rng.standard_normal((self.POOL_ROWS, DIMS), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        fmt = DEFAULT_TOKEN_FORMAT
        pool = encode_tokens(rows, fmt.codec, pool_factor=fmt.pool_factor)
        n = self.POOL_ROWS
        self.scales = pool[HEADER_BYTES : HEADER_BYTES + 4 * n]
        self.codes = pool[HEADER_BYTES + 4 * n :]
        self.width = bytes_per_token(fmt.codec, DIMS) - 4  # code bytes per row
        self.rows = rows
        self.headers: dict[int, bytes] = {}
        self.rng = rng

    def blob(self, n: int) -> bytes:
        header = self.headers.get(n)
        if header is None:
            fmt = DEFAULT_TOKEN_FORMAT
            header = encode_tokens(self.rows[:n], fmt.codec, pool_factor=fmt.pool_factor)[:HEADER_BYTES]
            self.headers[n] = header
        o = int(self.rng.integers(0, self.POOL_ROWS - n))
        return header + self.scales[4 * o : 4 * (o + n)] + self.codes[self.width * o : self.width * (o + n)]


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIMS), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith(DB_NAME))


def build(store: Store, count: int, batch: int, counts: np.ndarray | None, rng: np.random.Generator) -> dict:
    row = store.create_collection(
        "li-scale",
        "all-MiniLM-L6-v2",
        MODEL_ID,
        "cosine",
        DIMS,
        "{}",
        token_format=json.dumps(DEFAULT_TOKEN_FORMAT.to_json()),
        token_model_id=MODEL_ID,
    )
    filler = "x" * TEXT_BYTES
    synthetic = SyntheticBlobs(rng)
    for n in (1, 17, 64):  # the shortcut gives what the codec gives for the same rows
        if decode_tokens(synthetic.blob(n)).shape != (n, DIMS):
            raise AssertionError("synthetic blob does not decode")
    started = time.perf_counter()
    generate_s = 0.0
    blob_bytes = 0
    next_report = 0
    for start in range(0, count, batch):
        n = min(batch, count - start)
        t = time.perf_counter()
        blobs = [synthetic.blob(int(k)) for k in pooled_rows(counts, rng, n)]
        vectors = unit_vectors(rng, n)
        docs = [
            Document(id=f"doc-{start + i:07d}", text=f"{start + i:07d} " + filler[: TEXT_BYTES - 8])
            for i in range(n)
        ]
        generate_s += time.perf_counter() - t
        blob_bytes += sum(len(b) for b in blobs)
        store.upsert(
            row.id,
            docs,
            {d.id: vectors[i] for i, d in enumerate(docs)},
            {d.id: blobs[i] for i, d in enumerate(docs)},
        )
        done = start + n
        if done >= next_report or done == count:
            elapsed = time.perf_counter() - started
            log(
                f"  {done:,}/{count:,} documents, {elapsed:.0f} s, {done / elapsed:.0f} docs/s "
                f"({generate_s:.0f} s generating), {disk_bytes(store.path.parent) / 2**30:.1f} GiB on disk"
            )
            next_report = done + max(count // 50, batch)
    seconds = time.perf_counter() - started
    return {
        "collection_id": row.id,
        "build_s": round(seconds, 1),
        "generate_s": round(generate_s, 1),
        "store_s": round(seconds - generate_s, 1),
        "docs_per_s": round(count / seconds, 1),
        "docs_per_s_store_only": round(count / max(seconds - generate_s, 1e-9), 1),
        "mean_blob_bytes": round(blob_bytes / count, 1),
    }


def evict_from_page_cache(directory: Path) -> None:
    """Drops the store's files (only them) from the OS page cache, so that the first read of a candidate
    set really reads the disk: the build has just written everything through the cache."""
    for path in directory.iterdir():
        if path.name.startswith(DB_NAME):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(store: Store, collection_id: int, count: int, trials: int, rng: np.random.Generator) -> dict:
    """Late interaction on 100 random candidates from the store, as the server runs it: each random
    candidate set read and scored twice, first from disk (the file evicted from the page cache before the
    first trial; later trials find the B-tree's inner pages cached), then again (warm)."""
    conn = store._conn()  # the keys the store gave the documents (1..count unless reused)
    low, high = conn.execute(
        "SELECT MIN(key), MAX(key) FROM documents WHERE collection_id = ?", (collection_id,)
    ).fetchone()
    query = unit_vectors(rng, QUERY_TOKENS)
    first_read, first_total, warm_read, warm_total = [], [], [], []
    bytes_read = []
    for k in range(trials):
        keys = rng.choice(np.arange(low, high + 1), CANDIDATES, replace=False).tolist()
        for reads, totals in ((first_read, first_total), (warm_read, warm_total)):
            t = time.perf_counter()
            blobs = store.token_blobs(collection_id, keys)
            t_read = time.perf_counter()
            scores = maxsim_blobs(query, list(blobs.values()))
            t_done = time.perf_counter()
            reads.append((t_read - t) * 1000)
            totals.append((t_done - t) * 1000)
        if len(blobs) != CANDIDATES or len(scores) != CANDIDATES:
            raise SystemExit(f"trial {k}: {len(blobs)} blobs for {CANDIDATES} keys")
        if k == 0:
            for blob in blobs.values():
                check_blob(blob, DEFAULT_TOKEN_FORMAT, DIMS)
        bytes_read.append(sum(len(b) for b in blobs.values()))
    return {
        "trials": trials,
        "candidates": CANDIDATES,
        "query_tokens": QUERY_TOKENS,
        "first": {"read": percentiles(first_read), "read_and_maxsim": percentiles(first_total)},
        "warm": {"read": percentiles(warm_read), "read_and_maxsim": percentiles(warm_total)},
        "bytes_read_per_query": round(float(np.mean(bytes_read)), 1),
    }


def previous_build(documents: int) -> dict | None:
    """The build figures of the recorded run that made a store of this size (for --measure-only)."""
    path = (RESULTS if documents >= 1_000_000 else QUICK_RESULTS) / "late_interaction_scale.json"
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())
    if earlier.get("documents_stored") != documents or "build" not in earlier:
        return None
    return {"recorded": earlier.get("date"), "command": earlier.get("command"), **earlier["build"]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / ".cache" / "li-scale")
    parser.add_argument("--beir", type=Path, default=DEFAULT_BEIR, help="SciFact, for its token counts")
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--batch", type=int, default=1000, help="documents per store transaction")
    parser.add_argument("--trials", type=int, default=200, help="candidate sets measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-only", action="store_true", help="re-measure the store already in --dir")
    args = parser.parse_args()
    started = time.monotonic()
    rng = np.random.default_rng(args.seed)
    counts = None if args.measure_only else scifact_token_counts(args.beir, args.bundle)
    mean_rows = float(np.mean(-(-counts // DEFAULT_TOKEN_FORMAT.pool_factor))) if counts is not None else 60.0
    mean_blob = 16 + mean_rows * (DIMS + 4)
    estimate = args.count * (mean_blob + TEXT_BYTES + 4 * DIMS + ROW_OVERHEAD)
    path = args.dir / DB_NAME
    result: dict = {
        "count": args.count,
        "token_format": DEFAULT_TOKEN_FORMAT.describe(),
        "token_counts_from": str(args.beir) if counts is not None else "normal(238, 30), no data set",
        "scifact_tokens_mean": round(float(counts.mean()), 1) if counts is not None else None,
        # The reader's memory (--measure-only: no generator, no corpus) is what a server pays for the
        # store: it holds no per-document state; the OS page cache holds what it can of the file.
        "estimated_bytes": round(estimate),
        # Which store code wrote and read it (the server's, from whatever tree PYTHONPATH names).
        "store_py_sha256": hashlib.sha256(Path(store_module.__file__).read_bytes()).hexdigest(),
    }
    if args.measure_only:
        if not path.is_file():
            raise SystemExit(f"--measure-only: no store at {path}")
    else:
        if path.exists():
            raise SystemExit(f"{path} exists: remove --dir's store first, or pass --measure-only")
        args.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(args.dir).free
        if free < 1.1 * estimate:
            raise SystemExit(
                f"refusing: {args.count:,} documents need about {estimate / 2**30:.1f} GiB (+10 %), "
                f"{args.dir} has {free / 2**30:.1f} GiB free"
            )
        log(
            f"building {args.count:,} documents in {path} (about {estimate / 2**30:.1f} GiB; {free / 2**30:.0f} GiB free)"
        )
    store = SqliteStore(path)
    try:
        if args.measure_only:
            collection_id = store.get_collection("li-scale").id
            earlier = previous_build(store.get_collection("li-scale").doc_count)
            if earlier is not None:
                result["build"] = earlier
        else:
            result["build"] = build(store, args.count, args.batch, counts, rng)
            collection_id = result["build"]["collection_id"]
        store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        on_disk = disk_bytes(args.dir)
        row = store.get_collection("li-scale")
        result["documents_stored"] = row.doc_count
        result["tokens_stored"] = row.token_count
        result["disk_bytes"] = on_disk
        result["disk_bytes_per_document"] = round(on_disk / max(row.doc_count, 1), 1)
        evict_from_page_cache(args.dir)
        log(f"measuring late interaction on {CANDIDATES} candidates, {args.trials} candidate sets")
        result["late_interaction"] = measure(store, collection_id, row.doc_count, args.trials, rng)
    finally:
        store.close()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.measure_only:
        result.pop("token_counts_from")
        result.pop("scifact_tokens_mean")
        result.pop("estimated_bytes")
    result["peak_rss_bytes"] = peak_rss
    result["peak_rss_of"] = (
        "measure-only reader" if args.measure_only else "builder (synthetic row pool, batches)"
    )
    result["peak_rss_bytes_per_document"] = round(peak_rss / max(result["documents_stored"], 1), 2)
    li = result["late_interaction"]
    print(
        f"{result['documents_stored']:,} documents ({result['token_format']}): "
        + (
            f"built in {result['build']['build_s']:.0f} s ({result['build']['docs_per_s']:.0f} docs/s), "
            if "build" in result
            else ""
        )
        + f"{on_disk / 2**30:.1f} GiB on disk ({result['disk_bytes_per_document']:,.0f} B/document), "
        f"peak RSS {peak_rss / 2**20:.0f} MiB"
    )
    print(
        f"late interaction, {CANDIDATES} candidates ({li['bytes_read_per_query'] / 2**20:.2f} MiB read): "
        f"first read p50 {li['first']['read_and_maxsim']['p50_ms']:.1f} ms (read {li['first']['read']['p50_ms']:.1f}), "
        f"warm p50 {li['warm']['read_and_maxsim']['p50_ms']:.1f} ms (read {li['warm']['read']['p50_ms']:.1f}) "
        f"p90 {li['warm']['read_and_maxsim']['p90_ms']:.1f} ms"
    )
    write_result(
        "late_interaction_scale",
        result,
        command=command_line("bench/late_interaction_scale.py", sys.argv[1:]),
        quick=result["documents_stored"] < 1_000_000,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
