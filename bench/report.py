"""Render the README's "Measured" table from bench/results/*.json (never typed by hand).

.venv/bin/python bench/report.py          # rewrites the block between the markers in README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start (bench/report.py) -->", "<!-- results:end -->"


def _rows() -> list[str]:
    rows = ["| what | figure | command |", "|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        cmd = f"`{r['command']}`"
        if r.get("benchmark") == "eval":
            anchor = (
                "in-process reference: 0.709"
                if "late_interaction" in r["cascade"]
                else "published all-MiniLM-L6-v2: 0.6451"
            )
            rows.append(
                f"| {r['dataset']} nDCG@10 / recall@100 / MRR@10, cascade `{r['cascade']}`, through gRPC "
                f"({anchor}) | {r['ndcg@10']:.4f} / {r['recall@100']:.4f} / "
                f"{r['mrr@10']:.4f} | {cmd} |"
            )
        elif r.get("benchmark") == "service":
            rows.append(
                f"| `Search` latency, 1 client, {r['dataset']} ({r['documents']} docs, {r['queries']} queries, {r['samples']} calls),"
                f" top_k 10 | p50 {r['search_p50_ms']:.2f} ms, p99 {r['search_p99_ms']:.2f} ms | {cmd} |"
            )
            rows.append(
                f"| bare in-process work for the same queries (ONNX embed + usearch), same run | "
                f"p50 {r['bare_p50_ms']:.2f} ms, p99 {r['bare_p99_ms']:.2f} ms; **p50 ratio "
                f"{r['p50_ratio']:.2f}** (time inside the server p50 {r.get('server_took_p50_ms', float('nan')):.2f} ms)"
                f" | {cmd} |"
            )
            rows.append(
                f"| `UpsertDocuments` throughput (batches of 64, first {r['rate_docs']} docs) vs bare ONNX "
                f"embedding of the same texts, same run (bare pass after indexing, not interleaved) | {r['upsert_docs_per_s']:.1f} vs "
                f"{r['bare_embed_docs_per_s']:.1f} docs/s (ratio {r['upsert_vs_bare']:.2f}) | {cmd} |"
            )
        elif r.get("benchmark") == "client-overhead":
            rows.append(
                f"| Python client facade vs raw generated stub, `Search` ({r['documents']} docs, top_k 10, "
                f"{r['samples']} calls each, alternating on one channel) | facade p50 {r['facade_p50_ms']:.2f} ms vs "
                f"raw p50 {r['raw_p50_ms']:.2f} ms; **added {r['added_p50_ms'] * 1000:.0f} µs per call** "
                f"(median of pairs, {r['added_p50_share']:.1%}) | {cmd} |"
            )
        elif "maxsim-int8" in r.get("ndcg@10", {}):
            n = r["ndcg@10"]
            rows.append(
                f"| {r['dataset']} nDCG@10, in-process reference (no server): bi-encoder top-{r['candidates']} "
                f"re-ranked by MaxSim over MiniLM token vectors (zero-shot; fp32 / int8 / fp16 storage) | "
                f"{n['bi-encoder']:.4f} -> {n['maxsim-fp32']:.4f} / {n['maxsim-int8']:.4f} / "
                f"{n['maxsim-fp16']:.4f}; int8 {r['bytes_per_document']['int8'] / 1000:.0f} KB/doc | {cmd} |"
            )
    return rows


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print("README.md has no results markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + "\n".join(_rows()) + "\n" + END + tail)
    print("README.md results table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
