"""Render the README's "Measured" table and bench/REPORT.md from bench/results/*.json (never typed by hand).

.venv/bin/python bench/report.py          # rewrites the block between the markers in README.md, and REPORT.md

Quick runs (bench/run.py --quick) write bench/results/quick/<name>.json; a full run's result of the same
name is preferred, and every row of the `make bench` sections says which mode it shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUICK = RESULTS / "quick"  # bench/run.py --quick writes here: a quick run never replaces a full run's figures
START, END = "<!-- results:start (bench/report.py) -->", "<!-- results:end -->"
# Kinds written by the `make bench` sections (bench/run.py), rendered by _bench_rows.
BENCH_KINDS = {
    "quality",
    "floor",
    "concurrency",
    "scaling-corpus",
    "ann",
    "bi-encoder",
    "late-interaction-peers",
    "run",
}


def _read(path: Path) -> dict:  # type: ignore[type-arg]
    r = json.loads(path.read_text())
    if path.parent == QUICK:
        r.setdefault("mode", "quick")  # bench/rerank.py records no mode of its own
    return r


def _result_paths(pattern: str = "*.json") -> list[Path]:
    """One file per result name: the full run's where it exists, else the quick run's."""
    names = {p.name for p in (*RESULTS.glob(pattern), *QUICK.glob(pattern))}
    return [RESULTS / n if (RESULTS / n).is_file() else QUICK / n for n in sorted(names)]


def _rows() -> list[str]:
    rows = ["| what | figure | command |", "|---|---|---|"]
    paths = _result_paths()
    if (RESULTS / "run.json").is_file() and (QUICK / "run.json").is_file():
        paths.append(QUICK / "run.json")  # both wall times: `make bench` and `make bench-quick`
    for path in paths:
        r = _read(path)
        cmd = f"`{r['command']}`"
        if r.get("benchmark") == "eval":
            anchor = _eval_anchor(r["cascade"])
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
        elif r.get("benchmark") == "ingest":
            rows.append(
                f"| index job ingest, {r['dataset']} corpus ({r['documents']} docs, batches of {r['job_batch_size']}), "
                f"vs bare in-process ONNX embedding of the same texts, paired per corpus part in one run "
                f"(median of per-part ratios; load average 6 to 9: quote the ratios) | 1 worker process "
                f"{r['job_1_worker_docs_per_s']:.1f} vs {r['bare_docs_per_s_1']:.1f} docs/s "
                f"(**{r['job_1_worker_vs_bare_median']:.2f}**); 2 worker processes "
                f"{r['job_2_workers_docs_per_s']:.1f} vs {r['bare_docs_per_s_2']:.1f} docs/s "
                f"({r['job_2_workers_vs_bare_median']:.2f}) | {cmd} |"
            )
            rows.append(
                f"| {r['dataset']} nDCG@10 / recall@100 after an index job vs indexed through UpsertDocuments "
                f"(`sieve eval`'s code), same server | {r['ndcg@10_job']:.4f} / {r['recall@100_job']:.4f} vs "
                f"{r['ndcg@10_upsert']:.4f} / {r['recall@100_upsert']:.4f} | {cmd} |"
            )
        elif r.get("benchmark") == "client-overhead":
            rows.append(
                f"| Python client facade vs raw generated stub, `Search` ({r['documents']} docs, top_k 10, "
                f"{r['samples']} calls each, alternating on one channel) | facade p50 {r['facade_p50_ms']:.2f} ms vs "
                f"raw p50 {r['raw_p50_ms']:.2f} ms; **added {r['added_p50_ms'] * 1000:.0f} µs per call** "
                f"(median of pairs, {r['added_p50_share']:.1%}) | {cmd} |"
            )
        elif r.get("benchmark") == "rerank":
            rows.extend(_rerank_rows(r, cmd))
        elif r.get("benchmark") == "load":
            rows.extend(_load_rows(r, cmd))
        elif r.get("benchmark") in BENCH_KINDS:
            rows.extend(_bench_rows(r, cmd))
        elif isinstance(r.get("ndcg@10"), dict) and "maxsim-int8" in r["ndcg@10"]:
            n = r["ndcg@10"]
            rows.append(
                f"| {r['dataset']} nDCG@10, in-process reference (no server): bi-encoder top-{r['candidates']} "
                f"re-ranked by MaxSim over MiniLM token vectors (zero-shot; fp32 / int8 / fp16 storage) | "
                f"{n['bi-encoder']:.4f} -> {n['maxsim-fp32']:.4f} / {n['maxsim-int8']:.4f} / "
                f"{n['maxsim-fp16']:.4f}; int8 {r['bytes_per_document']['int8'] / 1000:.0f} KB/doc | {cmd} |"
            )
    return rows


def _eval_anchor(cascade: str) -> str:
    """The reference a `sieve eval` cascade's nDCG@10 is read against (../shared/REFERENCE.md)."""
    late = "late_interaction" in cascade
    if cascade.startswith("hybrid"):
        return "reference: fused top-100 re-ranked by MaxSim 0.712" if late else "reference: RRF 0.690"
    if cascade.startswith("lexical"):
        return "reference: BM25 0.662"
    return "in-process reference: 0.709" if late else "published all-MiniLM-L6-v2: 0.6451"


def _load_rows(r: dict, cmd: str) -> list[str]:  # type: ignore[type-arg]
    """bench/load.py: the mixed load at the default limit, then (if run) the same load past a low limit."""
    rows = []
    for run in r["runs"]:
        c, m, mem = run["config"], run["measured"], run["memory"]
        s, u = m["search"], m["upsert"]
        latency = (
            f"`Search` {s['per_s']:.1f}/s, p50 {s['p50_ms']:.0f} / p95 {s['p95_ms']:.0f} / p99 {s['p99_ms']:.0f} ms; "
            f"`UpsertDocuments` {u['per_s']:.1f}/s, p50 {u['p50_ms']:.0f} / p95 {u['p95_ms']:.0f} / p99 "
            f"{u['p99_ms']:.0f} ms"
        )
        outcome = f"**{run['errors']} errors** in {run['calls']:,} calls"
        if run["refused"] or run["limits"]["max_inflight_requests"] < c["clients"]:
            delays = ", ".join(f"{k} ms" for k in run["retry_delays_ms"]) or "none"
            outcome += f", {run['refused']:,} refused RESOURCE_EXHAUSTED, all with RetryInfo ({delays})"
        if run is r["runs"][0]:
            half = ""
            if "second_half_growth_mb" in mem:  # a one-time step (onnxruntime's arena) vs a creep
                half = (
                    f"; second half {mem['second_half_growth_mb']:+.1f} MB, "
                    f"{mem['second_half_slope_mb_per_min']:+.1f} MB/min"
                )
            rows.append(
                f"| load: {c['clients']} concurrent clients (a connection each, on the server's 2 cores), "
                f"{c['search_share']:.0%} `Search` (retrieval, top 10 with texts) / {1 - c['search_share']:.0%} "
                f"`UpsertDocuments` ({c['upsert_batch']} docs over a fixed {c['hot_ids']} ids), {m['seconds']:.0f} s "
                f"after {c['warmup_s']:.0f} s warm-up, {run['corpus']} ({run['documents']} docs), in-flight limit "
                f"{run['limits']['max_inflight_requests']}{_mode(r)} | {outcome}; {latency}; server RSS "
                f"{mem['rss_first_mb']:.0f} -> {mem['rss_last_mb']:.0f} MB (first vs last 10 s, "
                f"{mem['growth_mb']:+.1f} MB, slope {mem['slope_mb_per_min']:+.1f} MB/min{half}) | {cmd} |"
            )
        else:
            rows.append(
                f"| backpressure: the same load at SIEVE_MAX_INFLIGHT_REQUESTS={run['limits']['max_inflight_requests']}, "
                f"{m['seconds']:.0f} s (clients wait the RetryInfo delay){_mode(r)} | {outcome}; {latency} | {cmd} |"
            )
    return rows


PRE_REBUILD = (
    "measured before the late-interaction rebuild (token vectors then in a Redis cache, MaxSim on a worker; "
    "that code is gone, token vectors now live in the server's store): rerun the command for current figures"
)


def _pre_rebuild(r: dict) -> bool:  # type: ignore[type-arg]
    """A result written by the benchmarks' pre-rebuild versions (its keys name what they measured then)."""
    return (
        "li_cold" in r.get("variants", {})
        or "bare_late_interaction_recomputed" in r
        or "sieve_redis" in r.get("ms_per_query", {})
    )


def _rerank_rows(r: dict, cmd: str) -> list[str]:  # type: ignore[type-arg]
    """bench/rerank.py: latency per variant, the Celery path's overhead, ONNX vs sentence-transformers."""
    v, ratios, celery, be = r["variants"], r["ratios"], r["celery_overhead"], r["cross_encoder_backends"]
    n, q = r["candidates"], r["queries"]
    seeded = "a seeded checkpoint: speed and agreement only, no ranking quality"
    same = f"{q} {r['dataset']} queries x the same {n} bi-encoder candidates, variants interleaved per query"
    colbert = (
        f"; seeded ColBERT (128-d) warm {v['colbert_warm']['p50_ms']:.1f}" if "colbert_warm" in v else ""
    )
    if "li_warm_blas1" in v:
        colbert += (
            f"; warm late interaction with 1 BLAS thread {v['li_warm_blas1']['p50_ms']:.1f} "
            f"(CE fp32 / that {ratios['ce_fp32_over_li_warm_blas1_p50']:.0f}x)"
        )
    if _pre_rebuild(r):
        li = "late interaction warm (MiniLM zero-shot MaxSim; " + PRE_REBUILD + ") / cold (blobs recomputed)"
        other, other_label, other_ratio = "li_cold", "cold", ratios.get("li_cold_over_li_warm_p50", 0)
        li_stage, li_label = "li_warm", "late interaction warm (pre-rebuild)"
    else:
        li = (
            "late interaction warm (MiniLM zero-shot MaxSim as the server runs it: the query's encoder pass, "
            f"the blobs from the SQLite store, {r['late_interaction']['token_format']}) / pending (what "
            f"{n} documents without token vectors cost: encode + compress, sieve.document_tokens' work)"
        )
        other, other_label, other_ratio = "li_pending", "pending", ratios["li_pending_over_li_warm_p50"]
        li_stage, li_label = "li_pending", "pending documents' token vectors (sieve.document_tokens)"
    rows = [
        f"| re-ranking {n} candidates, p50 (p90) ms per query, {same}: {li} / cross-encoder ONNX fp32 / "
        f"int8, in-process (the cross-encoder is {seeded}) | warm {v['li_warm']['p50_ms']:.1f} "
        f"({v['li_warm']['p90_ms']:.1f}) / {other_label} {v[other]['p50_ms']:.0f} ({v[other]['p90_ms']:.0f}) / "
        f"CE fp32 {v['ce_fp32']['p50_ms']:.0f} ({v['ce_fp32']['p90_ms']:.0f}) / CE int8 "
        f"{v['ce_int8']['p50_ms']:.0f} ({v['ce_int8']['p90_ms']:.0f}){colbert}; **CE fp32 / warm late "
        f"interaction {ratios['ce_fp32_over_li_warm_p50']:.0f}x** (target >= "
        f"{ratios['target_ce_over_li_warm']}x), {other_label} / warm {other_ratio:.0f}x | {cmd} |",
    ]
    parts = []
    for stage, label in ((li_stage, li_label), ("ce_fp32", "cross-encoder fp32")):
        o = celery[stage]
        failed = ""
        if o.get("celery_failures"):
            reasons = {f["reason"] for f in r.get("failures", {}).get(f"{stage}_celery", [])}
            limits = r.get("worker_time_limits_s", {})
            limit = limits.get("cross_encoder") if stage == "ce_fp32" else limits.get("document_tokens")
            why = (
                f"the worker's {limit[0]} s soft time limit"
                if limit and all("SoftTimeLimitExceeded" in x for x in reasons)
                else "see the JSON"
            )
            failed = f"; {o['celery_failures']} of {q} calls failed: {why}, excluded from both p50s"
        if o["overhead_p50_ms"] < 0 or o["paired_overhead_median_ms"] < 0:
            failed += "; negative: below this run's noise"
        parts.append(
            f"{label} {o['in_process_p50_ms']:.1f} -> {o['celery_p50_ms']:.1f} ms "
            f"(**{o['overhead_p50_ms']:+.1f} ms**, x{o['ratio_p50']:.2f}; median of paired differences "
            f"{o['paired_overhead_median_ms']:+.1f} ms{failed})"
        )
    rows.append(
        f"| Celery path overhead: the same task through the Dispatcher (server/dispatch/dispatcher.py) and one "
        f"real worker (send_task, wait off the event loop) vs the same function in-process, p50, same run | "
        f"{'; '.join(parts)} | {cmd} |"
    )
    pps = be["pairs_per_s"]
    rows.append(
        f"| cross-encoder backends on the same seeded checkpoint (MiniLM encoder + seeded head; speed and "
        f"agreement only, no ranking quality) and the "
        f"same {q} x {n} pairs, {r['threads']} threads: pairs/s sentence-transformers `CrossEncoder` (PyTorch) "
        f"/ ONNX fp32 (batch 16) / ONNX int8 (one pair per run) | {pps['st_torch_fp32']:.1f} / "
        f"{pps['onnx_fp32']:.1f} (**{be['onnx_fp32_over_st']:.2f}x**) / {pps['onnx_int8']:.1f} "
        f"(**{be['onnx_int8_over_st']:.2f}x**) | {cmd} |"
    )
    agree = be["agreement_vs_st"]
    cells = [
        f"{name.split('_')[1]} Spearman {a['spearman_mean']:.4f} (min {a['spearman_min']:.4f}), top-10 overlap "
        f"{a['top10_overlap_mean']:.1f}/10 (min {a['top10_overlap_min']})"
        for name, a in agree.items()
    ]
    rows.append(
        f"| rank agreement with sentence-transformers per query over the {n} candidates, ONNX fp32 / int8 "
        f"({seeded}) | {'; '.join(cells)} | {cmd} |"
    )
    return rows


# -- `make bench` (bench/run.py): README rows and bench/REPORT.md ------------------------------------------

REPORT = ROOT / "bench" / "REPORT.md"
PLOTS = RESULTS / "plots"
# Published nDCG@10 (../shared/REFERENCE.md), shown beside the measured cascades of a whole corpus.
PUBLISHED = {
    "scifact": [
        ("BM25 (BEIR paper, Table 2)", 0.665),
        ("all-MiniLM-L6-v2 bi-encoder (MTEB)", 0.6451),
        ("BM25 top-100 + MiniLM-L6 cross-encoder (BEIR paper)", 0.688),
        ("ColBERTv2 (paper)", 0.693),
        ("MiniLM top-100 re-ranked by MaxSim over its own token vectors (in-process reference)", 0.709),
        ("answerai-colbert-small-v1 (model card)", 0.7477),
    ],
    "nfcorpus": [("BM25", 0.325), ("all-MiniLM-L6-v2", 0.3159), ("BM25+CE", 0.350), ("ColBERTv2", 0.338)],
    "fiqa": [("BM25", 0.236), ("all-MiniLM-L6-v2", 0.3687), ("BM25+CE", 0.347), ("ColBERTv2", 0.356)],
}
ANN_NAMES = {
    "usearch_cos": "usearch, cosine f32 (Sieve's index before the f16 and i8 layouts)",
    "sieve_i8": "Sieve's VectorIndex, i8 (the default layout)",
    "sieve_f16": "Sieve's VectorIndex, f16",
    "sieve_f32": "Sieve's VectorIndex, f32",
    "usearch_ip": "usearch, inner product",
    "faiss_hnsw": "FAISS IndexHNSWFlat",
    "exact": "exact (numpy BLAS)",
}


def _mode(r: dict) -> str:  # type: ignore[type-arg]
    return {"quick": " [quick run]", "full": " [full run]"}.get(r.get("mode", ""), "")


def _whole_corpus(r: dict) -> bool:  # type: ignore[type-arg]
    return str(r.get("corpus", "")).startswith("the whole corpus")


def _bench_rows(r: dict, cmd: str) -> list[str]:  # type: ignore[type-arg]
    """README rows of the `make bench` sections (one or a few headline rows each; REPORT.md has the rest)."""
    kind, m = r.get("benchmark"), _mode(r)
    if kind == "quality":
        published = dict(PUBLISHED.get(r["dataset"], []))
        rows = []
        for run in r["runs"]:
            anchor = ""
            if _whole_corpus(r):
                ref = 0.709 if run["spec"] == "late" else published.get("all-MiniLM-L6-v2 bi-encoder (MTEB)")
                anchor = f" (reference: {ref})" if ref else ""
            rows.append(
                f"| {r['dataset']} nDCG@10 / recall@100 / MRR@10, cascade `{run['cascade']}`, gRPC Search on "
                f"`sieve run`, {r['documents']} documents{anchor}{m} | {run['ndcg@10']:.4f} / "
                f"{run['recall@100']:.4f} / {run['mrr@10']:.4f} | {cmd} |"
            )
        return rows
    if kind == "floor":
        p, s = r["p50_ms"], r["overhead_share_p50"]
        return [
            f"| physical floor, p50 over {r['queries']} queries: `Search` vs the same work in-process (retrieve; "
            f"retrieve 100 > late interaction; the late-interaction stage alone){m}"
            f"{'; ' + PRE_REBUILD if _pre_rebuild(r) else ''} | "
            f"{p['retrieve_client']:.1f} vs {p['retrieve_bare']:.1f} ms ({s['retrieve_request']:.0%} overhead); "
            f"{p['late_client']:.1f} vs {p['late_bare']:.1f} ms ({s['late_request']:.0%}); stage "
            f"{p['late_stage_late']:.1f} vs {p['late_bare_stage']:.1f} ms ({s['late_interaction_stage']:.0%}) | {cmd} |"
        ]
    if kind == "concurrency":
        cells = []
        for spec, label in (("retrieve", "retrieve"), ("late", "+ late interaction")):
            passes = [x for x in r["passes"] if x["cascade"] == spec]
            if passes:
                lo, hi = passes[0], passes[-1]
                cells.append(
                    f"{label}: {lo['throughput_qps']:.0f} q/s (p50 {lo['p50_ms']:.0f} ms) at {lo['clients']} client, "
                    f"{hi['throughput_qps']:.0f} q/s (p50 {hi['p50_ms']:.0f}, p99 {hi['p99_ms']:.0f} ms) at "
                    f"{hi['clients']}"
                )
        return [
            f"| `Search` throughput and latency vs concurrent clients, {r['dataset']} ({r['documents']} docs), "
            f"top 10 with documents, client on the same 2 cores{m} | {'; '.join(cells)} | {cmd} |"
        ]
    if kind == "scaling-corpus":
        cells = []
        for s in r["sizes"]:
            qps = {t["threads"]: t["qps"] for t in s["threads"]}
            most = max(qps)
            cells.append(
                f"{s['vectors']:,}: {s['top10']['p50_ms']:.2f} / {s['top10']['p99_ms']:.2f} ms, "
                f"{qps[most]:,.0f} searches/s at {most} threads, recall@10 {s['recall@10']:.3f}"
            )
        return [
            f"| index search vs corpus size, synthetic 384-d: p50 / p99 top 10 (one thread), throughput; the "
            f"server's VectorIndex in-process, not through gRPC (the API takes texts, not vectors){m} | "
            f"{'; '.join(cells)} | {cmd} |"
        ]
    if kind == "ann":
        return [_ann_row(d, m, cmd) for d in r["datasets"]]
    if kind == "bi-encoder":
        t, lat = r["texts_per_s"], r["single_text_latency"]
        return [
            f"| bi-encoder all-MiniLM-L6-v2, Sieve ONNX runner vs sentence-transformers `encode`, same texts, "
            f"{r['threads']} threads: documents/s; one query p50{m} | {t['onnx']:.1f} vs "
            f"{t['sentence_transformers']:.1f} texts/s (**{r['onnx_over_st']:.2f}x**); {lat['onnx']['p50_ms']:.1f} vs "
            f"{lat['sentence_transformers']['p50_ms']:.1f} ms | {cmd} |"
        ]
    if kind == "late-interaction-peers":
        ms = r["ms_per_query"]
        cells = [f"{k} {v['p50_ms']:.1f}" for k, v in ms.items()]
        return [
            f"| warm late interaction over {r['candidates']} candidates, seeded ColBERT checkpoint (speed only), ms "
            f"per query p50: Sieve stage / Sieve in memory / peers{m} | {', '.join(cells)} | {cmd} |"
        ]
    if kind == "run":
        ok = sum(1 for s in r["sections"] if s["status"] == "ok")
        return [
            f"| `make bench{'-quick' if r.get('mode') == 'quick' else ''}` wall time, all sections, plots and "
            f"report | {r['wall_s'] / 60:.1f} min ({ok}/{len(r['sections'])} steps ok) | {cmd} |"
        ]
    return []


ANN_SHORT = {
    "usearch_cos": "usearch cos f32 (Sieve before f16/i8)",
    "sieve_i8": "Sieve i8 (default)",
    "sieve_f16": "Sieve f16",
    "sieve_f32": "Sieve f32",
    "faiss_hnsw": "FAISS HNSW",
    "exact": "exact",
}


def _ann_row(d: dict, m: str, cmd: str) -> str:  # type: ignore[type-arg]
    """One README row per ANN data set: Sieve's index in its layout (where the run has it) / usearch cos f32 /
    FAISS HNSW / exact, and the paired ratios."""
    sieve = [x for x in d["systems"] if x.startswith("sieve_")]
    names = [x for x in (*sieve, "usearch_cos", "faiss_hnsw", "exact") if x in d["systems"]]
    sy = [d["systems"][x] for x in names]

    def cell(label: str, values: list[str]) -> str:
        return f"{label} {' / '.join(values)}"

    cells = [
        cell("build", [f"{v['build_s']:,.0f} s" if v["build_s"] else "-" for v in sy]),
        cell("batch QPS", [f"{v['qps']:,.0f}" for v in sy]),
        cell("1-query p50", [f"{v['latency']['p50_ms']:.2f} ms" for v in sy]),
        cell("recall@10", [f"{v['recall@10']:.3f}" for v in sy]),
        cell("serialized", [f"{v['bytes_per_vector']:.0f} B/vector" for v in sy]),
    ]
    hnsw = [v for x, v in zip(names, sy, strict=True) if x != "exact"]
    if all("rss_bytes_per_vector" in v for v in hnsw) and d["vectors"] >= 100_000:
        cells.append(cell("resident", [f"{v['rss_bytes_per_vector']:.0f}" for v in hnsw]) + " B/vector")
    p = d.get("paired")
    for x in sieve:
        if p and f"qps_{x}_over_faiss" in p:
            cells.append(
                f"**{ANN_SHORT.get(x, x)} / FAISS batch QPS, paired: x{p[f'qps_{x}_over_faiss']:.2f}**"
            )
    if p:
        cells.append(
            f"**usearch cos f32 / FAISS, paired: build time x{p['build_time_usearch_cos_over_faiss']:.2f}, QPS "
            f"x{p['qps_usearch_cos_over_faiss']:.2f}, 1-query latency x{p['latency_usearch_cos_over_faiss']:.2f}**"
        )
    side = "built and searched side by side (in turn)" if p else "one after the other"
    return (
        f"| ANN peers on {d['name']} ({d['vectors']:,} x {d['dims']}), same M/ef/threads, {side}: "
        f"{' / '.join(ANN_SHORT[x] for x in names)}{m} | {'; '.join(cells)} | {cmd} |"
    )


def _load(name: str) -> dict | None:  # type: ignore[type-arg]
    """The full run's result where one exists, else the quick run's."""
    for path in (RESULTS / f"{name}.json", QUICK / f"{name}.json"):
        if path.is_file():
            return _read(path)
    return None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _plot(name: str, alt: str) -> list[str]:
    return [f"![{alt}](results/plots/{name}.png)", ""] if (PLOTS / f"{name}.png").is_file() else []


def _source(r: dict) -> str:  # type: ignore[type-arg]
    m = r.get("machine", {})
    parts = [f"`{r['command']}`"]
    if "mode" in r:
        parts.append(f"{r['mode']} mode")
    parts.append(str(r.get("date", "?"))[:10])
    if "wall_s" in r:
        parts.append(f"{r['wall_s']:.0f} s")
    load = m.get("loadavg") or m.get("loadavg_after")
    machine = f"{m.get('cpus')} CPUs" + (f", load average {load[0]} at the end" if load else "")
    return "_" + ", ".join(parts) + "; " + machine + "._"


def _section_quality() -> list[str]:
    out = ["## 1. Quality through gRPC", ""]
    found = _result_paths("quality-*.json")
    if not found:
        return [*out, "_Not measured yet (`python bench/scaling.py service BEIR_DIR`)._", ""]
    for path in found:
        r = _read(path)
        out += [
            f"**{r['dataset']}**: {r['corpus']}, {r['queries']} test queries. Indexed by an index job "
            f"({r['index_job_docs_per_s']:.1f} docs/s, token vectors cached in the same encoder pass), then every "
            "query through `Search` once per cascade (top 100 ids), scored as `sieve eval` scores.",
            "",
        ]
        rows = [
            [
                f"`{run['cascade']}`",
                f"{run['ndcg@10']:.4f}",
                f"{run['recall@100']:.4f}",
                f"{run['mrr@10']:.4f}",
                f"{run['search_queries_per_s']:.1f}",
                ", ".join(f"{k} {v:.1f}" for k, v in run["stage_ms_p50"].items()),
            ]
            for run in r["runs"]
        ]
        out += _table(["cascade", "nDCG@10", "recall@100", "MRR@10", "queries/s", "stage p50 ms"], rows)
        published = PUBLISHED.get(r["dataset"], [])
        if published and _whole_corpus(r):
            out += [
                "",
                "Published and reference figures (../shared/REFERENCE.md), same data set and metric:",
                "",
            ]
            out += _table(["system", "nDCG@10"], [[name, f"{v}"] for name, v in published])
        elif published:
            out += [
                "",
                "A subset of the corpus has fewer distractors, so these figures are higher than, and not comparable "
                "with, published ones; the full run (`make bench`) indexes the whole corpus.",
            ]
        out += ["", *_plot(path.stem, "quality"), _source(r), ""]
    return out


def _section_floor() -> list[str]:
    r = _load("floor")
    out = ["## 2. Each stage against its physical floor", ""]
    if r is None:
        return [*out, "_Not measured yet._", ""]
    p, q = r["p50_ms"], r["p99_ms"]
    out += [
        f"{r['queries']} queries of {r['dataset']} ({r['documents']} documents); for each, in one loop: `Search` "
        "through gRPC, then the same work in this process. The query-vector and score caches are flushed before "
        + (
            "every call, token vectors stay cached (the warm steady state). This result was "
            + PRE_REBUILD
            + "."
            if _pre_rebuild(r)
            else "every call; token vectors are stored with the documents (the steady state)."
        ),
        "",
    ]
    rows = [
        [
            "retrieve, top 10: whole `Search` (client)",
            f"{p['retrieve_client']:.2f}",
            f"{q['retrieve_client']:.2f}",
            f"{p['retrieve_bare']:.2f}",
            f"{r['overhead_share_p50']['retrieve_request']:.0%}",
        ],
        [
            "retrieve stage, as the server reports it",
            f"{p['retrieve_stage']:.2f}",
            f"{q['retrieve_stage']:.2f}",
            f"{p['retrieve_bare']:.2f}",
            f"{r['overhead_share_p50']['retrieve_stage_in_server']:.0%}",
        ],
        [
            "late-interaction stage (server: Celery + worker + Redis, pre-rebuild)"
            if _pre_rebuild(r)
            else "late-interaction stage (server: blobs from its store, MaxSim in its executor)",
            f"{p['late_stage_late']:.2f}",
            f"{q['late_stage_late']:.2f}",
            f"{p['late_bare_stage']:.2f}",
            f"{r['overhead_share_p50']['late_interaction_stage']:.0%}",
        ],
        [
            "retrieve 100 > late interaction > top 10: whole `Search`",
            f"{p['late_client']:.2f}",
            f"{q['late_client']:.2f}",
            f"{p['late_bare']:.2f}",
            f"{r['overhead_share_p50']['late_request']:.0%}",
        ],
    ]
    out += _table(
        ["stage", "service p50 ms", "service p99 ms", "bare in-process p50 ms", "overhead share"], rows
    )
    out += [
        "",
        f"Of the bare work, the query embedding alone is {p['retrieve_bare_embed']:.2f} ms (p50). A negative share "
        "means the bare run in the benchmark's own process was the slower one: read it as no overhead measurable "
        "at this machine's noise. What each figure includes:",
        "",
    ]
    out += [f"- `{k}`: {v}" for k, v in r["definitions"].items()]
    rr = _load("rerank")
    if rr is not None and "celery_overhead" in rr:
        o = rr["celery_overhead"]
        if _pre_rebuild(rr):
            li = (
                f"late interaction {o['li_warm']['in_process_p50_ms']:.1f} -> {o['li_warm']['celery_p50_ms']:.1f} ms "
                f"({PRE_REBUILD}), "
            )
        else:
            li = (
                f"pending documents' token vectors (sieve.document_tokens; the late-interaction stage itself now "
                f"runs in the server and has no worker path) {o['li_pending']['in_process_p50_ms']:.1f} -> "
                f"{o['li_pending']['celery_p50_ms']:.1f} ms, "
            )
        out += [
            "",
            "The Celery path alone (bench/rerank.py, same task in-process vs through the Dispatcher, "
            f"server/dispatch/dispatcher.py, and a real worker): {li}cross-encoder "
            f"{o['ce_fp32']['in_process_p50_ms']:.1f} -> {o['ce_fp32']['celery_p50_ms']:.1f} ms ({rr['command']}).",
        ]
    return [*out, "", *_plot("floor", "floor"), _source(r), ""]


def _section_scaling() -> list[str]:
    out = ["## 3. Scaling", "", "### Client concurrency (real service)", ""]
    r = _load("concurrency")
    if r is None:
        out += ["_Not measured yet._", ""]
    else:
        out += [
            f"{r['dataset']}, {r['documents']} documents; {r['request']}; {r['caches']}; {r['client']}. Each pass "
            "sends max(base, 4 x clients) distinct queries (base 300; quick mode: max(30, clients)).",
            "",
        ]
        rows = [
            [
                x["cascade"],
                str(x["clients"]),
                f"{x['throughput_qps']:.1f}",
                f"{x['p50_ms']:.1f}",
                f"{x['p99_ms']:.1f}",
                f"{x['completed']}/{x['requests']}",
                str(x["degraded"]),
                ", ".join(f"{k} {v}" for k, v in x["errors"].items()) or "0",
            ]
            for x in r["passes"]
        ]
        out += _table(
            ["cascade", "clients", "queries/s", "p50 ms", "p99 ms", "completed", "degraded", "errors"], rows
        )
        out += ["", *_plot("concurrency", "concurrency"), _source(r), ""]
    out += ["### Corpus size (the index alone)", ""]
    r = _load("scaling-corpus")
    if r is None:
        return [*out, "_Not measured yet._", ""]
    bi = _load("bi-encoder")
    rate = f" (about {bi['texts_per_s']['onnx']:.0f} texts/s, section 4)" if bi else ""
    out += [
        f"{r['what']}. A query's embedding (section 2) costs the same at any corpus size, so a `Search` at size N "
        "costs about the section-2 figure plus the change in these index latencies.",
        "",
        "**Not through gRPC.** The API takes texts only: `UpsertDocuments` and index jobs embed each document's "
        "text on the server, and `Search` embeds the query text, so synthetic vectors cannot be sent through it, "
        f"and embedding 100k real texts on this machine{rate} would take hours. No vector API was added for the "
        "benchmark: these figures are the server's own VectorIndex class, measured in-process.",
        "",
    ]
    threads = [t["threads"] for t in r["sizes"][0]["threads"]]
    rows = [
        [
            f"{s['vectors']:,}",
            f"{s['top10']['p50_ms']:.3f}",
            f"{s['top10']['p99_ms']:.3f}",
            f"{s['top100']['p50_ms']:.3f}",
            f"{s['top100']['p99_ms']:.3f}",
            f"{s['recall@10']:.4f}",
            *(f"{t['qps']:,.0f}" for t in s["threads"]),
            f"{s['index_file_bytes_per_vector']:.0f}",
        ]
        for s in r["sizes"]
    ]
    out += _table(
        [
            "vectors",
            "top10 p50 ms",
            "top10 p99 ms",
            "top100 p50 ms",
            "top100 p99 ms",
            "recall@10",
            *(f"QPS {t} threads" for t in threads),
            "bytes/vector",
        ],
        rows,
    )
    return [*out, "", *_plot("scaling-corpus", "corpus size"), _source(r), ""]


def _section_peers() -> list[str]:
    out = ["## 4. Beside the peers", "", "### ANN: usearch vs FAISS vs exact", ""]
    r = _load("ann")
    if r is None:
        out += ["_Not measured yet._", ""]
    else:
        s = r["settings"]
        side = s.get("side_by_side")
        out += [
            f"Same vectors and queries for all; M={s['connectivity']}, ef_construction={s['ef_construction']}, "
            f"ef_search={s['ef_search']}, top {s['k']}; builds and batch searches on {s['threads']} threads; "
            f"latency: {s['latency']}. Recall@10 against the exact top 10."
            + (
                f" Side by side: {side} (batch QPS: the median round), so that the shared machine's changing "
                "load hits every system alike; the paired ratios are medians over slices, rounds and queries."
                if side
                else " The systems ran one after the other."
            )
            + " The synthetic mixture is deliberately hard (1,000 vectors per cluster, spread in a 48-dimensional "
            "subspace: many near-ties among the true neighbours), so its recall at a given ef_search is well below "
            "what real embeddings get (SciFact above)."
            + " Data sets were measured one after the other, at whatever load the shared machine had then: compare "
            "systems within a data set, not one data set's absolute figures with another's."
            + " Resident B/vector: the process's resident-set growth over the build (shown from 100k vectors; "
            "on small corpora freed memory is reused and it reads low); usearch's own `memory_usage` counts "
            "reserved capacity too.",
            "",
        ]
        for d in r["datasets"]:
            rounds = f", {d['rounds']} batch rounds" if "rounds" in d else ""
            load = d.get("load_average_1min")
            if load:
                rounds += f", load average {load['min']:.1f} to {load['max']:.1f} while measured"
            out += [
                f"**{d['name']}**: {d['vectors']:,} x {d['dims']}, {d['queries']} queries{rounds} "
                f"({d.get('note', '')})",
                "",
            ]
            big = d["vectors"] >= 100_000
            rows = [
                [
                    ANN_NAMES.get(k, k),
                    f"{v['build_s']:,.1f}",
                    f"{v['qps']:,.0f}",
                    f"{v['latency']['p50_ms']:.3f}",
                    f"{v['latency']['p99_ms']:.3f}",
                    f"{v['recall@10']:.4f}",
                    f"{v['bytes_per_vector']:.0f}",
                    f"{v['rss_bytes_per_vector']:.0f}" if big and "rss_bytes_per_vector" in v else "-",
                    f"{v['memory_bytes_per_vector']:.0f}" if "memory_bytes_per_vector" in v else "-",
                ]
                for k, v in d["systems"].items()
            ]
            out += _table(
                [
                    "system",
                    "build s",
                    "batch QPS",
                    "1-query p50 ms",
                    "1-query p99 ms",
                    "recall@10",
                    "serialized B/vector",
                    "resident B/vector",
                    "usearch memory_usage B/vector",
                ],
                rows,
            )
            p = d.get("paired")
            if p:
                out += [
                    "",
                    f"Paired, usearch cos / FAISS: build time x{p['build_time_usearch_cos_over_faiss']:.2f}, batch "
                    f"QPS x{p['qps_usearch_cos_over_faiss']:.2f}, one-query latency "
                    f"x{p['latency_usearch_cos_over_faiss']:.2f}; usearch cos / exact batch QPS "
                    f"x{p['qps_usearch_cos_over_exact']:.2f}."
                    + "".join(
                        f" {ANN_NAMES.get(k[4:-11], k[4:-11])} / FAISS batch QPS x{v:.2f}."
                        for k, v in p.items()
                        if k.startswith("qps_sieve_") and k.endswith("_over_faiss")
                    ),
                ]
            out.append("")
        out += [*_plot("ann", "ANN peers"), _source(r), ""]
    out += ["### Cross-encoder: ONNX fp32 / int8 vs sentence-transformers", ""]
    rr = _load("rerank")
    if rr is None or "cross_encoder_backends" not in rr:
        out += [
            "_bench/results/rerank.json is not recorded yet (`make bench-rerank` records it; `make bench` runs bench/rerank.py too)._",
            "",
        ]
    else:
        be = rr["cross_encoder_backends"]
        pps, agree = be["pairs_per_s"], be["agreement_vs_st"]
        out += [
            f"Seeded MiniLM cross-encoder checkpoint (speed and agreement only), {rr['queries']} queries x "
            f"{rr['candidates']} candidates, {rr['threads']} threads. Rank agreement with sentence-transformers per "
            "query (Spearman, top-10 overlap).",
            "",
        ]
        rows = [
            ["sentence-transformers `CrossEncoder` (PyTorch)", f"{pps['st_torch_fp32']:.1f}", "1.00", "-"],
            [
                "Sieve ONNX fp32",
                f"{pps['onnx_fp32']:.1f}",
                f"{be['onnx_fp32_over_st']:.2f}",
                f"{agree['onnx_fp32']['spearman_mean']:.4f}, {agree['onnx_fp32']['top10_overlap_mean']:.1f}/10",
            ],
            [
                "Sieve ONNX int8",
                f"{pps['onnx_int8']:.1f}",
                f"{be['onnx_int8_over_st']:.2f}",
                f"{agree['onnx_int8']['spearman_mean']:.4f}, {agree['onnx_int8']['top10_overlap_mean']:.1f}/10",
            ],
        ]
        out += _table(["backend", "pairs/s", "vs ST", "agreement with ST"], rows)
        out += [
            "",
            "Reference (other hardware): ONNX fp32 about 1.0x PyTorch, int8 about 1.4x (sentence-transformers' own comparison).",
            "",
            _source(rr),
            "",
        ]
    out += ["### Late interaction: warm ColBERT stage vs colbert-ai / PyLate", ""]
    li = _load("late-interaction-peers")
    if li is None:
        out += ["_Not measured yet._", ""]
    else:
        out += [
            f"{li['model_note']}. {li['queries']} queries x {li['candidates']} candidates ({li['candidate_source']}); "
            f"document token vectors precomputed by each side; timed per query from the query text. PyLate: "
            f"{li['pylate']}. Sides at {li['threads']} threads, and (`_1t`) the in-memory ones again at 1 thread: on a "
            "busy machine torch's thread pool, called back to back, degrades far more than onnxruntime's, so "
            "compare like with like. Sieve scores int8 blobs (decoded per query, 4x smaller than float32); the "
            "peers keep float32 matrices in memory. "
            + (
                f"`sieve_redis` was {PRE_REBUILD}."
                if _pre_rebuild(li)
                else "`sieve_store`: the blobs (int8, unpooled) read by key from a store of the server's kind "
                "(SQLite `tokens` table), as the server does for a ColBERT collection (its query encoding "
                "in-process here, a colbert worker's sieve.query_tokens there); `sieve_store_pool4`: the same "
                "in the default format (int8, pool 4)."
            ),
            "",
        ]
        agree = li["agreement_vs_sieve"]
        rows = [
            [
                k,
                f"{v['p50_ms']:.1f}",
                f"{v['p90_ms']:.1f}",
                f"{li['documents_per_s'].get(k.split('_')[0], float('nan')):.1f}",
                f"{agree[k]['spearman_mean']:.5f}" if k in agree else "-",
            ]
            for k, v in li["ms_per_query"].items()
        ]
        out += _table(
            ["implementation", "ms/query p50", "p90", "documents encoded/s", "Spearman vs Sieve"], rows
        )
        out += ["", _source(li), ""]
    out += ["### Bi-encoder: ONNX runner vs sentence-transformers", ""]
    bi = _load("bi-encoder")
    if bi is None:
        return [*out, "_Not measured yet._", ""]
    t, lat = bi["texts_per_s"], bi["single_text_latency"]
    out += [
        f"{bi['model']}, {bi['texts_per_round']} {bi['dataset']} documents x {bi['rounds']} rounds per side "
        f"(alternating), batch {bi['batch_size']}, max length {bi['max_length']}, {bi['threads']} threads. Cosine "
        f"between the two sides' vectors: min {bi['cosine_onnx_vs_st']['min']:.6f}.",
        "",
    ]
    st_name = f"sentence-transformers {bi['sentence_transformers_process'].get('sentence_transformers', '')} (PyTorch)"

    def one(key: str) -> list[str]:
        x = lat.get(key)
        return [f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}"] if x else ["-", "-"]

    out += _table(
        [
            "implementation",
            "documents/s",
            "one query p50 ms",
            "p99 ms",
            "one query, 1 thread: p50 ms",
            "p99 ms",
        ],
        [
            ["Sieve ONNX (BiEncoderRunner)", f"{t['onnx']:.1f}", *one("onnx"), *one("onnx_1_thread")],
            [
                st_name,
                f"{t['sentence_transformers']:.1f}",
                *one("sentence_transformers"),
                *one("sentence_transformers_1_thread"),
            ],
        ],
    )
    out += [
        "",
        "Reference (../shared/REFERENCE.md, this kind of machine): sentence-transformers 5.7 torch 22.8 texts/s and "
        "11.1 ms per query; its ONNX backend 24.4 texts/s and 5.7 ms.",
        "",
        *_plot("peers", "peers"),
        _source(bi),
        "",
    ]
    return out


def write_report() -> None:
    runs = [_read(p) for p in (RESULTS / "run.json", QUICK / "run.json") if p.is_file()]
    run = runs[0] if runs else None
    head = [
        "# Sieve benchmark report",
        "",
        "Generated by `bench/report.py` from `bench/results/*.json` (do not edit by hand); plots by `bench/plots.py`. "
        "`make bench` (full) or `make bench-quick` (bounded: a corpus subset, 10k synthetic vectors, fewer queries) "
        "re-measures everything on this machine and rewrites this page. Every figure names the command that made it; "
        "each JSON records the machine and library versions. The machine is shared and noisy: compare figures of the "
        "same run (ratios), not absolute times across runs. A quick run writes bench/results/quick/ and never "
        "replaces a full run's figures; each section shows the full run's where there is one, and its source "
        "line says which mode it comes from.",
        "",
    ]
    for run in runs:
        steps = ", ".join(
            f"{s['section']} {s.get('seconds', 0):.0f} s ({s['status']})"
            for s in run["sections"]
            if "seconds" in s
        )
        m = run["machine"]
        head += [
            f"Last complete {run['mode']} `bench/run.py`: `{run['command']}`, {run['date'][:10]}, **{run['wall_s'] / 60:.1f} "
            f"minutes** wall time ({steps}). Machine: {m['cpus']} CPUs ({m.get('processor', '')}), "
            f"{m.get('memory_gb', '?')} GB, Python {m['python']}. A section re-measured since then by its own "
            "command says so in its source line (command, mode, date).",
            "",
        ]
    body = _section_quality() + _section_floor() + _section_scaling() + _section_peers()
    versions = (run or {}).get("machine", {}).get("versions", {})
    tail = []
    if versions:
        tail = ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    REPORT.write_text("\n".join(head + body + tail).rstrip() + "\n")
    print(f"{REPORT.relative_to(ROOT)} written")


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
    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
