"""Reading token vectors from the store: 100 SciFact-sized blobs by key, as a late-interaction search does.

    .venv/bin/python bench/token_store.py [--docs 20000] [--bytes 23000 90000] [--reads 200] [--out FILE]

Builds a throw-away store (server/storage/store.py, the server's SQLite file: WAL, synchronous=FULL) in a
temporary folder with `--docs` documents, each with a random token blob of each `--bytes` size (23 KB:
int8 after pooling by 4, the default format; 90 KB: int8 without pooling), then times
`Store.token_blobs(collection, 100 random keys)` `--reads` times (keys drawn with a fixed seed, the page
cache warm after the build, as on a server that has served a while). Prints and writes JSON: per size, the
p50/p90 milliseconds of one read of 100 blobs and the MB/s they amount to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from server.storage.store import Store
from sieve_core.types import Document


def measure(docs: int, blob_bytes: int, reads: int, batch: int = 100) -> dict[str, float]:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "sieve.db")
        try:
            cid = store.create_collection("bench", "m", "m@r", "cosine", 4, "{}", "{}", "m@r").id
            vector = np.zeros(4, dtype=np.float32)
            for start in range(0, docs, 500):
                chunk = [Document(f"d{i}", f"text {i}") for i in range(start, min(docs, start + 500))]
                store.upsert(
                    cid, chunk, {d.id: vector for d in chunk}, {d.id: rng.bytes(blob_bytes) for d in chunk}
                )
            keys = [p.key for p in store.documents_by_keys(cid, range(1, docs + 1), with_text=False).values()]
            times = []
            for _ in range(reads):
                pick = rng.choice(keys, batch, replace=False).tolist()
                started = time.perf_counter()
                got = store.token_blobs(cid, pick)
                times.append((time.perf_counter() - started) * 1000)
                assert len(got) == batch
            size_mb = store.size_bytes() / 1e6
        finally:
            store.close()
    p50 = statistics.median(times)
    return {
        "blob_bytes": blob_bytes,
        "docs": docs,
        "store_mb": round(size_mb, 1),
        "read_100_p50_ms": round(p50, 3),
        "read_100_p90_ms": round(float(np.percentile(times, 90)), 3),
        "mb_per_s_at_p50": round(batch * blob_bytes / 1e6 / (p50 / 1000), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--bytes", type=int, nargs="+", default=[23_000, 90_000])
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = [measure(args.docs, size, args.reads) for size in args.bytes]
    for r in results:
        print(
            f"{r['blob_bytes']:>6} B blobs, {r['docs']} docs ({r['store_mb']} MB store): 100 by key "
            f"p50 {r['read_100_p50_ms']:.2f} ms, p90 {r['read_100_p90_ms']:.2f} ms ({r['mb_per_s_at_p50']} MB/s)"
        )
    if args.out:
        args.out.write_text(json.dumps({"token_store_reads": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
