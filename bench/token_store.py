"""The server's token-vector costs: reading 100 SciFact-sized blobs by key from the store (as a
late-interaction search does), and what storing token vectors adds to a write's encoder pass.

    .venv/bin/python bench/token_store.py [--docs 20000] [--bytes 23000 90000] [--reads 200] [--out FILE]
    .venv/bin/python bench/token_store.py --write-cost ../shared/datasets/scifact [--texts 256] [--rounds 5]

--write-cost: the first `--texts` SciFact documents (title + text), embedded the way UpsertDocuments does
(batches of 32, one BLAS thread as in the server), in interleaved rounds: vectors only (`encode`), then
vectors and token vectors from the same pass (`encode(tokens=True)`) plus compression to the default format
(int8, pool 4). Prints docs/s of each, their ratio (the issue asks >= 0.9), and the compression's share.

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

from server.storage.store import SqliteStore
from sieve_core.types import Document


def measure(docs: int, blob_bytes: int, reads: int, batch: int = 100) -> dict[str, float]:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "sieve.db")
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


def write_cost(folder: Path, texts_n: int, rounds: int) -> dict[str, float]:
    from threadpoolctl import threadpool_limits

    from sieve_core.beir import load_beir
    from sieve_core.models.bi_encoder import BiEncoderRunner
    from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress_many

    threadpool_limits(limits=1, user_api="blas")
    texts = list(load_beir(folder).corpus.values())[:texts_n]
    runner = BiEncoderRunner(Path(__file__).resolve().parent.parent / "models" / "all-MiniLM-L6-v2")
    runner.warmup()
    plain, tokens, compress_s = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        runner.encode(texts, 32)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        _, rows = runner.encode(texts, 32, tokens=True)
        packed = time.perf_counter()
        compress_many(rows, DEFAULT_TOKEN_FORMAT)  # type: ignore[arg-type]
        tokens.append(time.perf_counter() - started)
        compress_s.append(time.perf_counter() - packed)
    plain_rate = len(texts) / statistics.median(plain)
    token_rate = len(texts) / statistics.median(tokens)
    return {
        "texts": len(texts),
        "rounds": rounds,
        "plain_docs_per_s": round(plain_rate, 1),
        "with_tokens_docs_per_s": round(token_rate, 1),
        "ratio": round(token_rate / plain_rate, 3),
        "compress_ms_per_doc": round(statistics.median(compress_s) / len(texts) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--bytes", type=int, nargs="+", default=[23_000, 90_000])
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--write-cost", type=Path, default=None, metavar="BEIR_FOLDER")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.write_cost is not None:
        cost = write_cost(args.write_cost, args.texts, args.rounds)
        print(
            f"{cost['texts']} SciFact texts: vectors only {cost['plain_docs_per_s']} docs/s, with token vectors "
            f"(same pass + int8 pool 4) {cost['with_tokens_docs_per_s']} docs/s: x{cost['ratio']} "
            f"(compression {cost['compress_ms_per_doc']} ms/doc)"
        )
        if args.out:
            args.out.write_text(json.dumps({"token_write_cost": cost}, indent=2) + "\n")
        return
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
