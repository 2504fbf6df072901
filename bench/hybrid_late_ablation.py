"""Which setting of hybrid+late costs nDCG@10 on SciFact: the token format (pooling, codec), the candidate
depth, the fusion's k, and which candidates reach MaxSim.

    .venv/bin/python bench/hybrid_late_ablation.py [../shared/datasets/scifact] [--limit-docs N] [--limit-queries N]

In-process, through the project's own code, as the service runs `sieve eval --cascade hybrid+late`: the
corpus (title + " " + text) goes through all-MiniLM-L6-v2 once (`BiEncoderRunner.encode(..., tokens=True)`,
the pooled vector and the token rows from one pass, cached in bench/.cache); BM25 is the project's tantivy
index (server.storage.fulltext, English analyzer); the dense side is exact cosine (the service's HNSW finds
the same top 100 here to within its recall); the two lists are fused by server.core.fusion.fuse; the
candidates are re-ranked by `maxsim_blobs` over `compress`ed blobs as the server scores them (fp32: MaxSim
over the raw token rows, the reference's way). Every variant is one change from the service's default
(each side's top 100, RRF k=60, the fused top 100 re-ranked, the default token format), so its row says what
that one setting is worth; none is chosen by these test queries. Prints a table and writes
bench/results/hybrid_late_ablation.json: per variant nDCG@10, MRR@10, recall@100 of the re-ranked list,
bytes per document of the stored token vectors and MaxSim ms per query (p50).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as bench/token_formats.py: pooling's small GEMMs

import numpy as np  # noqa: E402
import onnxruntime  # noqa: F401, I001, E402  # before usearch (server.storage.index)
from late_interaction_reference import _rerank, encode_both, limit_dataset
from run import CACHE, DEFAULT_BEIR, ROOT, command_line, log, write_result

from server.core.fusion import Ranked, fuse
from server.storage.fulltext import FullTextIndex
from server.storage.index import exact_scores
from sieve_core.beir import evaluate, load_beir
from sieve_core.late_interaction import maxsim, maxsim_blobs
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, TokenFormat, compress, prepare_query
from sieve_core.types import FusionMethod


@dataclass(frozen=True)
class Variant:
    name: str
    fmt: TokenFormat | None = DEFAULT_TOKEN_FORMAT  # None: fp32 token rows (no stored format)
    depth: int = 100  # each side's candidates
    keep: int = 100  # fused candidates re-ranked by MaxSim (0: the whole union of both sides)
    rrf_k: int = 60


BATCH = 32  # texts per encoder run
DEFAULT = Variant(f"default: {DEFAULT_TOKEN_FORMAT.describe()}; each side 100, RRF k=60, fused top 100")
VARIANTS = (
    DEFAULT,
    Variant("fp32 token vectors (the reference's MaxSim)", fmt=None),
    Variant("int8, no pooling", fmt=TokenFormat(pool_factor=1, codec="int8")),
    Variant("int8, pool 2", fmt=TokenFormat(pool_factor=2, codec="int8")),
    Variant("int8, pool 3", fmt=TokenFormat(pool_factor=3, codec="int8")),
    Variant("int8, pool 4 (the default before int4)", fmt=TokenFormat(pool_factor=4, codec="int8")),
    Variant("int4, pool 3", fmt=TokenFormat(pool_factor=3, codec="int4")),
    Variant("int4, pool 4", fmt=TokenFormat(pool_factor=4, codec="int4")),
    Variant("int4, no pooling", fmt=TokenFormat(pool_factor=1, codec="int4")),
    Variant("fp16, pool 4", fmt=TokenFormat(pool_factor=4, codec="fp16")),
    Variant("fp16, no pooling", fmt=TokenFormat(pool_factor=1, codec="fp16")),
    Variant("each side 200, fused top 100", depth=200),
    Variant("each side 100, whole union re-ranked (up to 200)", keep=0),
    Variant("each side 200, fused top 200", depth=200, keep=200),
    Variant("RRF k=20", rrf_k=20),
    Variant("RRF k=100", rrf_k=100),
    Variant("int8, no pooling, whole union re-ranked", fmt=TokenFormat(pool_factor=1, codec="int8"), keep=0),
)


def _encoded(runner: BiEncoderRunner, name: str, texts: list[str], batch: int):
    """(vectors, token rows per text), cached by model and texts (encoding SciFact takes minutes here)."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = CACHE / "hybrid_late" / f"{runner.model_id.replace('/', '_')}-{name}-{digest}.npz"
    if path.is_file():
        data = np.load(path)
        rows, offsets = data["rows"], data["offsets"]
        return data["vectors"], [rows[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    vectors, tokens = encode_both(runner, texts, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
    np.savez(path, vectors=vectors, rows=np.concatenate(tokens), offsets=offsets)
    return vectors, tokens


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path, nargs="?", default=DEFAULT_BEIR, help="BEIR folder (SciFact)")
    for option in ("--limit-docs", "--limit-queries"):
        parser.add_argument(option, type=int, default=None, help="a smoke run (written to results/quick)")
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="TEXT",
        help="only the variants whose names contain one of these (the default always runs); written to "
        "results/quick",
    )
    return parser.parse_args()


def main() -> int:
    args = _arguments()
    if not (args.beir / "corpus.jsonl").is_file():
        print(f"no BEIR data set at {args.beir}: nothing measured", file=sys.stderr)
        return 0
    started = time.monotonic()
    dataset = limit_dataset(load_beir(args.beir, "test"), args.limit_docs, args.limit_queries)
    doc_ids, query_ids = list(dataset.corpus), list(dataset.queries)
    texts, queries = [dataset.corpus[d] for d in doc_ids], [dataset.queries[q] for q in query_ids]
    runner = BiEncoderRunner(ROOT / "models" / "all-MiniLM-L6-v2")
    runner.warmup()
    log(f"{dataset.name}: {len(doc_ids)} documents, {len(query_ids)} queries; encoding (cached after once)")
    doc_vectors, doc_tokens = _encoded(runner, "docs", texts, BATCH)
    query_vectors, query_tokens = _encoded(runner, "queries", queries, BATCH)

    bm25 = FullTextIndex(None, "english")
    bm25.apply(list(enumerate(texts)), [], 1)
    bm25.flush()
    max_depth = min(max(v.depth for v in VARIANTS), len(doc_ids))
    dense_lists, lexical_lists = [], []
    for qv, text in zip(query_vectors, queries, strict=True):
        scores = exact_scores("cosine", qv, doc_vectors)
        top = np.argpartition(-scores, max_depth - 1)[:max_depth]
        top = top[np.argsort(-scores[top], kind="stable")]
        dense_lists.append(Ranked(top.astype(np.uint64), scores[top]))
        lexical_lists.append(Ranked(*bm25.search(text, max_depth)))

    blobs: dict[TokenFormat, tuple[list[bytes], float]] = {}
    rows: list[dict[str, object]] = []
    chosen = [
        v for v in VARIANTS if v is DEFAULT or not args.variants or any(t in v.name for t in args.variants)
    ]
    for variant in chosen:
        if variant.fmt is not None and variant.fmt not in blobs:
            log(f"compressing {len(texts)} documents as {variant.fmt.describe()}")
            stored = [compress(t, variant.fmt) for t in doc_tokens]
            blobs[variant.fmt] = (stored, float(np.mean([len(b) for b in stored])))
        run: dict[str, list[str]] = {}
        maxsim_ms = []
        for qid, q_rows, dense, lexical in zip(
            query_ids, query_tokens, dense_lists, lexical_lists, strict=True
        ):
            d = Ranked(dense.keys[: variant.depth], dense.scores[: variant.depth])
            lx = Ranked(lexical.keys[: variant.depth], lexical.scores[: variant.depth])
            keep = variant.keep or 2 * variant.depth
            candidates = [f.key for f in fuse(d, lx, keep, FusionMethod.RRF, rrf_k=variant.rrf_k)]
            t0 = time.perf_counter()
            if variant.fmt is None:
                scores = maxsim(q_rows, [doc_tokens[k] for k in candidates])
            else:
                scores = maxsim_blobs(
                    prepare_query(q_rows, variant.fmt), [blobs[variant.fmt][0][k] for k in candidates]
                )
            maxsim_ms.append(1000 * (time.perf_counter() - t0))
            run[qid] = _rerank([doc_ids[k] for k in candidates], scores)
        metrics = {k: round(v, 4) for k, v in evaluate(run, dataset.qrels).items()}
        bytes_per_doc = (
            blobs[variant.fmt][1]
            if variant.fmt is not None
            else float(np.mean([len(t) for t in doc_tokens]) * runner.dims * 4)
        )
        row = {
            "variant": variant.name,
            "token_format": variant.fmt.describe() if variant.fmt is not None else "fp32",
            "depth_per_side": variant.depth,
            "reranked": variant.keep or "union",
            "rrf_k": variant.rrf_k,
            **metrics,
            "bytes_per_document": round(bytes_per_doc, 1),
            "maxsim_ms_p50": round(float(np.median(maxsim_ms)), 3),
        }
        rows.append(row)
        log(
            f"{variant.name:<55} nDCG@10 {row['ndcg@10']:.4f}  recall@100 {row['recall@100']:.3f}  "
            f"{bytes_per_doc / 1024:7.1f} KB/doc  MaxSim p50 {row['maxsim_ms_p50']:.1f} ms"
        )
    payload = {
        "dataset": dataset.name,
        "documents": len(doc_ids),
        "queries": len(query_ids),
        "model": runner.model_id,
        "tokens_per_document": round(float(np.mean([len(t) for t in doc_tokens])), 1),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "variants": rows,
    }
    command = command_line("bench/hybrid_late_ablation.py", sys.argv[1:])
    quick = args.limit_docs is not None or args.limit_queries is not None or bool(args.variants)
    write_result("hybrid_late_ablation", payload, command=command, quick=quick, started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
