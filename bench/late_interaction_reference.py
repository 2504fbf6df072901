"""In-process reference for the late-interaction stage: bi-encoder top-100, re-ranked by MaxSim.

    .venv/bin/python bench/late_interaction_reference.py ../shared/datasets/scifact \\
        [--limit-docs N] [--candidates 100] [--out bench/results/late-interaction-reference.json]

No server: the corpus (title + " " + text) goes through all-MiniLM-L6-v2 once, and each batch's last
hidden state gives both the pooled document vector (as BiEncoderRunner.embed computes it) and the
document's token vectors (as BiEncoderRunner.token_vectors computes them), so nothing is encoded twice.
Queries likewise. Then per test query: exact cosine top-`candidates` (server.index.exact_scores), and
that list re-ranked by MaxSim over fp32 token vectors and over the int8 and fp16 blobs of
sieve_core.token_codec (decoded as a worker would decode them from Redis). Prints and writes
nDCG@10 per variant, MaxSim milliseconds per query, and bytes per document. Timings, per query over the
candidates: `<fmt>_maxsim` is MaxSim alone on already-decoded vectors (decode excluded);
`<fmt>_maxsim_blobs` is the warm production path, MaxSim straight from the blobs (decode included);
`<fmt>_decode` + `<fmt>_maxsim` = `<fmt>_decode_and_maxsim` decodes all candidates first;
`fp32_maxsim` is `maxsim` over the fp32 arrays (chunked copy + GEMM), `fp32_maxsim_naive_loop` one product
per document, `fp32_pack` + `fp32_maxsim_prepacked` all candidates packed into one matrix, then one GEMM.

--limit-docs N keeps every document judged for a (kept) test query plus the first others in corpus order
up to N in all, and --limit-queries N the first N test queries: quick smoke runs whose figures are not
comparable with the full data set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401  # before usearch (server.storage.index): importing usearch first segfaults here
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from run import advance

from server.storage.index import exact_scores
from sieve_core.beir import BeirDataset, evaluate, load_beir
from sieve_core.late_interaction import decode_packed, maxsim, maxsim_blobs, maxsim_naive, maxsim_packed, pack
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.token_codec import encode_tokens

ROOT = Path(__file__).resolve().parent.parent

FORMATS = ("int8", "fp16")
DEFAULT_OUT = ROOT / "bench" / "results" / "late-interaction-reference.json"
_MASK_EPS, _NORM_EPS = 1e-9, 1e-12  # as in bi_encoder.py


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def encode_both(
    runner: BiEncoderRunner,
    texts: Sequence[str],
    batch_size: int,
    progress: Progress | None = None,
    label: str = "",
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pooled vectors, per-text token vectors) from one encoder run (`BiEncoderRunner.encode`)."""
    task = progress.add_task(label, total=len(texts)) if progress is not None else None
    chunk = max(batch_size * 8, 1)  # length-sorted batching inside each chunk; progress between chunks
    vectors: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        part_vectors, part_tokens = runner.encode(part, batch_size, tokens=True)
        assert part_tokens is not None
        vectors.append(part_vectors)
        tokens.extend(part_tokens)
        if progress is not None and task is not None:
            advance(progress, task, len(part))
    pooled = np.concatenate(vectors) if vectors else np.empty((0, runner.dims), dtype=np.float32)
    return pooled, tokens


def limit_dataset(dataset: BeirDataset, limit_docs: int | None, limit_queries: int | None) -> BeirDataset:
    if limit_queries is not None and limit_queries < len(dataset.queries):
        queries = dict(list(dataset.queries.items())[:limit_queries])
        qrels = {q: dataset.qrels[q] for q in queries}
        dataset = BeirDataset(dataset.name, dataset.corpus, queries, qrels)
    limit = limit_docs
    if limit is None or limit >= len(dataset.corpus):
        return dataset
    judged = {d for rel in dataset.qrels.values() for d in rel if d in dataset.corpus}
    keep = list(judged)
    for doc_id in dataset.corpus:
        if len(keep) >= limit:
            break
        if doc_id not in judged:
            keep.append(doc_id)
    return BeirDataset(dataset.name, {d: dataset.corpus[d] for d in keep}, dataset.queries, dataset.qrels)


def _ms(values: list[float]) -> dict[str, float]:
    arr = np.array(values) * 1000
    return {
        "median": round(float(np.median(arr)), 3),
        "p90": round(float(np.percentile(arr, 90)), 3),
        "mean": round(float(arr.mean()), 3),
    }


def _rerank(candidates: list[str], scores: np.ndarray) -> list[str]:
    # Stable: ties keep the bi-encoder's order.
    return [candidates[i] for i in np.argsort(-scores, kind="stable")]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--limit-docs", type=int, default=None)
    parser.add_argument("--limit-queries", type=int, default=None, help="first N test queries only")
    parser.add_argument("--candidates", type=int, default=100, help="bi-encoder top-N to re-rank")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "late-interaction-reference.json"
    )
    args = parser.parse_args()
    console = Console(stderr=True)

    dataset = limit_dataset(load_beir(args.beir, "test"), args.limit_docs, args.limit_queries)
    doc_ids = list(dataset.corpus)
    query_ids = list(dataset.queries)
    runner = BiEncoderRunner(args.bundle)
    runner.warmup()
    console.print(
        f"{dataset.name}: {len(doc_ids)} documents, {len(query_ids)} test queries, "
        f"model {runner.model_id}; one encoder pass gives both vectors and token vectors"
    )

    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        start = time.perf_counter()
        doc_vectors, doc_tokens = encode_both(
            runner, [dataset.corpus[d] for d in doc_ids], args.batch_size, progress, "documents"
        )
        embed_seconds = time.perf_counter() - start
        query_vectors, query_tokens = encode_both(
            runner, [dataset.queries[q] for q in query_ids], args.batch_size, progress, "queries"
        )
        blobs: dict[str, list[bytes]] = {fmt: [] for fmt in FORMATS}
        encode_task = progress.add_task("encode", total=len(doc_ids))
        encode_seconds = dict.fromkeys(FORMATS, 0.0)
        for tokens in doc_tokens:
            for fmt in FORMATS:
                t0 = time.perf_counter()
                blobs[fmt].append(encode_tokens(tokens, fmt))
                encode_seconds[fmt] += time.perf_counter() - t0
            advance(progress, encode_task)

        variants = ("bi-encoder", "maxsim-fp32", "maxsim-int8", "maxsim-fp16")
        runs: dict[str, dict[str, list[str]]] = {v: {} for v in variants}
        timings: dict[str, list[float]] = {
            k: []
            for k in (
                "fp32_maxsim",
                "fp32_maxsim_naive_loop",
                "fp32_pack",
                "fp32_maxsim_prepacked",
                "int8_decode",
                "int8_maxsim",
                "int8_decode_and_maxsim",
                "int8_maxsim_blobs",
                "fp16_decode",
                "fp16_maxsim",
                "fp16_decode_and_maxsim",
                "fp16_maxsim_blobs",
            )
        }
        moved_bytes: dict[str, list[int]] = {fmt: [] for fmt in FORMATS}
        rerank_task = progress.add_task("re-rank", total=len(query_ids))
        for qi, qid in enumerate(query_ids):
            scores = exact_scores("cosine", query_vectors[qi], doc_vectors)
            count = min(args.candidates, len(doc_ids))
            top = np.argpartition(-scores, count - 1)[:count]
            top = top[np.argsort(-scores[top], kind="stable")]
            candidates = [doc_ids[i] for i in top]
            runs["bi-encoder"][qid] = candidates
            q = query_tokens[qi]

            chosen_tokens = [doc_tokens[i] for i in top]
            t0 = time.perf_counter()
            fp32 = maxsim(q, chosen_tokens)
            t1 = time.perf_counter()
            naive = maxsim_naive(q, chosen_tokens)
            t2 = time.perf_counter()
            packed = pack(chosen_tokens, dims=runner.dims)
            t3 = time.perf_counter()
            prepacked = maxsim_packed(q, packed)
            t4 = time.perf_counter()
            timings["fp32_maxsim"].append(t1 - t0)
            timings["fp32_maxsim_naive_loop"].append(t2 - t1)
            timings["fp32_pack"].append(t3 - t2)
            timings["fp32_maxsim_prepacked"].append(t4 - t3)
            for other in (naive, prepacked):
                if not np.allclose(fp32, other, rtol=1e-4, atol=1e-4):
                    raise AssertionError(f"query {qid}: MaxSim implementations disagree")
            runs["maxsim-fp32"][qid] = _rerank(candidates, fp32)

            for fmt in FORMATS:
                chosen = [blobs[fmt][i] for i in top]
                t0 = time.perf_counter()
                decoded = decode_packed(chosen)
                t1 = time.perf_counter()
                approx = maxsim_packed(q, decoded)
                t2 = time.perf_counter()
                timings[f"{fmt}_decode"].append(t1 - t0)
                timings[f"{fmt}_maxsim"].append(t2 - t1)
                timings[f"{fmt}_decode_and_maxsim"].append(t2 - t0)
                t0 = time.perf_counter()
                fused = maxsim_blobs(q, chosen)
                timings[f"{fmt}_maxsim_blobs"].append(time.perf_counter() - t0)
                if not np.allclose(fused, approx, rtol=1e-4, atol=1e-4):
                    raise AssertionError(
                        f"query {qid}: maxsim_blobs disagrees with decode_packed + maxsim_packed"
                    )
                moved_bytes[fmt].append(sum(len(b) for b in chosen))
                runs[f"maxsim-{fmt}"][qid] = _rerank(candidates, approx)
            advance(progress, rerank_task)

    # A few single-query encodings: what a warm re-rank pays before MaxSim (the search path already
    # runs this pass for the query vector; with one shared pass the token vectors come free).
    sample = [dataset.queries[q] for q in query_ids[:50]]
    query_encode: list[float] = []
    for text in sample:
        t0 = time.perf_counter()
        encode_both(runner, [text], 1)
        query_encode.append(time.perf_counter() - t0)

    metrics = {v: {k: round(x, 4) for k, x in evaluate(runs[v], dataset.qrels).items()} for v in variants}
    lengths = np.array([len(t) for t in doc_tokens])
    bytes_per_doc = {fmt: round(float(np.mean([len(b) for b in blobs[fmt]])), 1) for fmt in FORMATS}
    bytes_per_doc["fp32 (raw, for comparison)"] = round(float(lengths.mean() * runner.dims * 4), 1)

    table = Table(
        title=f"{dataset.name}: bi-encoder top-{args.candidates} re-ranked by MaxSim "
        f"({runner.model_id} token vectors)"
    )
    for column in ("variant", "nDCG@10", "recall@100", "MRR@10"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for v in variants:
        m = metrics[v]
        table.add_row(v, f"{m['ndcg@10']:.4f}", f"{m['recall@100']:.4f}", f"{m['mrr@10']:.4f}")
    out_console = Console(width=None if sys.stdout.isatty() else 120)
    out_console.print(table)
    timing_ms = {k: _ms(v) for k, v in timings.items()}
    speed = Table(title=f"ms per query, {args.candidates} candidates, {lengths.mean():.0f} tokens/doc mean")
    for column in ("step", "median", "p90", "mean"):
        speed.add_column(column, justify="right" if column != "step" else "left")
    for k, v in timing_ms.items():
        speed.add_row(k, f"{v['median']:.2f}", f"{v['p90']:.2f}", f"{v['mean']:.2f}")
    speed.add_row("query encode (1 text)", *(f"{x:.2f}" for x in _ms(query_encode).values()))
    out_console.print(speed)
    out_console.print("bytes per document: " + ", ".join(f"{k} {v:,.0f}" for k, v in bytes_per_doc.items()))
    out_console.print(f"documents embedded at {len(doc_ids) / embed_seconds:.1f}/s ({embed_seconds:.0f} s)")

    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": dataset.name,
        "documents": len(doc_ids),
        "queries": len(query_ids),
        "limit_docs": args.limit_docs,
        "limit_queries": args.limit_queries,
        "candidates": args.candidates,
        "model": runner.model_id,
        "max_length": runner.manifest.max_length,
        "ndcg@10": {v: metrics[v]["ndcg@10"] for v in variants},
        "metrics": metrics,
        "ms_per_query": timing_ms,
        "query_encode_ms": _ms(query_encode),
        "bytes_per_document": bytes_per_doc,
        "bytes_moved_per_query": {fmt: round(float(np.mean(v)), 1) for fmt, v in moved_bytes.items()},
        "tokens_per_document": {
            "mean": round(float(lengths.mean()), 1),
            "max": int(lengths.max()),
            "min": int(lengths.min()),
        },
        "encode_ms_per_document": {
            fmt: round(1000 * s / len(doc_ids), 4) for fmt, s in encode_seconds.items()
        },
        "documents_per_second_embedding": round(len(doc_ids) / embed_seconds, 2),
        "embedding_seconds": round(embed_seconds, 1),
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "onnxruntime": metadata.version("onnxruntime"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    out_console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
