"""Plots of bench/results/*.json as PNGs in bench/results/plots/ (matplotlib, Agg: no display needed).

    .venv/bin/python bench/plots.py

Each plot is drawn only when its results exist; bench/report.py embeds whichever PNGs are there. A full
run's result (bench/results/<name>.json) is preferred to a quick run's (bench/results/quick/<name>.json),
and every title says which it shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUICK = RESULTS / "quick"  # quick-mode results (bench/run.py --quick)
PLOTS = RESULTS / "plots"

# Published SciFact nDCG@10 (../shared/REFERENCE.md) drawn beside the measured cascades.
PUBLISHED = {
    "scifact": [
        ("BM25 (BEIR paper)", 0.665),
        ("all-MiniLM-L6-v2 (MTEB)", 0.6451),
        ("BM25 + MiniLM cross-encoder (BEIR)", 0.688),
        ("ColBERTv2 (paper)", 0.693),
        ("MiniLM MaxSim re-rank, in-process reference", 0.709),
    ]
}


def _read(path: Path) -> dict[str, Any]:
    r = json.loads(path.read_text())
    if path.parent == QUICK:
        r.setdefault("mode", "quick")  # bench/rerank.py records no mode of its own
    return r


def load(name: str) -> dict[str, Any] | None:
    """The full run's result where one exists, else the quick run's."""
    for path in (RESULTS / f"{name}.json", QUICK / f"{name}.json"):
        if path.is_file():
            return _read(path)
    return None


def _title(r: dict[str, Any], what: str) -> str:
    mode = {"quick": " (quick run)", "full": " (full run)"}.get(r.get("mode", ""), "")
    return f"{what}{mode}"


def _save(fig: Any, name: str) -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(PLOTS / f"{name}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {(PLOTS / f'{name}.png').relative_to(ROOT)}")


def quality() -> None:
    names = sorted({p.stem for p in (*RESULTS.glob("quality-*.json"), *QUICK.glob("quality-*.json"))})
    for name in names:
        r = load(name)
        assert r is not None
        runs = r["runs"]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        labels = [run["cascade"] for run in runs]
        ndcg = [run["ndcg@10"] for run in runs]
        bars = ax.barh(labels, ndcg, color="#3b75af")
        ax.bar_label(bars, labels=[f"{x:.4f}" for x in ndcg], padding=3)
        published = PUBLISHED.get(r["dataset"], []) if r.get("documents", 0) >= 5000 else []
        for i, (label, value) in enumerate(published):
            ax.axvline(value, color=f"C{i + 1}", linestyle="--", linewidth=1, label=f"{label}: {value}")
        if published:
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xlim(0, max([*ndcg, *(v for _, v in published)]) * 1.15)
        ax.set_xlabel("nDCG@10 (through gRPC Search)")
        sub = (
            ""
            if published
            else f"\nsubset of {r['documents']} documents: not comparable with published figures"
        )
        ax.set_title(_title(r, f"{r['dataset']}: quality per cascade") + sub, fontsize=9)
        _save(fig, name)


def floor() -> None:
    r = load("floor")
    if r is None:
        return
    p = r["p50_ms"]
    rows = [
        ("retrieve: Search (client)", p["retrieve_bare"], p["retrieve_client"]),
        ("retrieve: stage (in server)", p["retrieve_bare"], p["retrieve_stage"]),
        ("late interaction: stage", p["late_bare_stage"], p["late_stage_late"]),
        ("retrieve 100 > late: Search (client)", p["late_bare"], p["late_client"]),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = [x[0] for x in rows]
    bare = [x[1] for x in rows]
    over = [max(0.0, x[2] - x[1]) for x in rows]
    ax.barh(labels, bare, color="#3b75af", label="bare in-process work (p50)")
    ax.barh(labels, over, left=bare, color="#e1812c", label="what the service adds (p50 difference)")
    for i, (_, b, total) in enumerate(rows):
        share = 1 - b / total
        note = f"{share:.0%} overhead" if share >= 0 else "the bare run was slower"
        ax.text(max(b, total) * 1.01, i, f"{total:.1f} ms ({note})", va="center", fontsize=8)
    ax.set_xlim(0, max(max(x[1], x[2]) for x in rows) * 1.6)
    ax.set_xlabel("ms")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        _title(r, f"The physical floor: each stage vs its bare work ({r['queries']} queries)"), fontsize=9
    )
    _save(fig, "floor")


def concurrency() -> None:
    r = load("concurrency")
    if r is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = {"retrieve": "retrieve (no re-ranking)", "late": "retrieve 100 > late interaction"}
    for i, spec in enumerate(("retrieve", "late")):
        passes = [p for p in r["passes"] if p["cascade"] == spec]
        if not passes:
            continue
        c = [p["clients"] for p in passes]
        ax1.plot(c, [p["p50_ms"] for p in passes], marker="o", color=f"C{i}", label=f"{names[spec]} p50")
        ax1.plot(
            c,
            [p["p99_ms"] for p in passes],
            marker="^",
            linestyle="--",
            color=f"C{i}",
            label=f"{names[spec]} p99",
        )
        ax2.plot(c, [p["throughput_qps"] for p in passes], marker="o", color=f"C{i}", label=names[spec])
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("Search latency, ms (client)")
    ax2.set_ylabel("throughput, queries/s")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(
        _title(r, f"gRPC Search vs client concurrency, {r['dataset']} ({r['documents']} documents)"),
        fontsize=10,
    )
    _save(fig, "concurrency")


def corpus() -> None:
    r = load("scaling-corpus")
    if r is None:
        return
    sizes = [s["vectors"] for s in r["sizes"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, color in (("top10", "C0"), ("top100", "C1")):
        ax1.plot(sizes, [s[k]["p50_ms"] for s in r["sizes"]], marker="o", color=color, label=f"{k} p50")
        ax1.plot(
            sizes,
            [s[k]["p99_ms"] for s in r["sizes"]],
            marker="^",
            linestyle="--",
            color=color,
            label=f"{k} p99",
        )
    threads = [t["threads"] for t in r["sizes"][0]["threads"]]
    for i, t in enumerate(threads):
        ax2.plot(sizes, [s["threads"][i]["qps"] for s in r["sizes"]], marker="o", label=f"{t} threads")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("vectors in the index")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("search latency, ms (one thread)")
    ax2.set_ylabel("searches/s (top 10)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(
        _title(r, "VectorIndex (usearch HNSW, cosine) in-process, no gRPC, vs corpus size, synthetic 384-d"),
        fontsize=10,
    )
    _save(fig, "scaling-corpus")


def ann() -> None:
    r = load("ann")
    if r is None:
        return
    systems = ["usearch_cos", "usearch_ip", "faiss_hnsw", "exact"]
    names = {
        "usearch_cos": "usearch cos (Sieve)",
        "usearch_ip": "usearch ip",
        "faiss_hnsw": "FAISS HNSW",
        "exact": "exact",
    }
    datasets = r["datasets"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        # A system a data set did not run (quick mode skips usearch ip on synthetic data) is left out.
        pairs = [
            (i + j * width, d["systems"][system]) for i, d in enumerate(datasets) if system in d["systems"]
        ]
        if not pairs:
            continue
        xs, vals = [x for x, _ in pairs], [v for _, v in pairs]
        axes[0].bar(xs, [v["build_s"] for v in vals], width, label=names[system], color=f"C{j}")
        axes[1].bar(xs, [v["qps"] for v in vals], width, color=f"C{j}")
        b = axes[2].bar(xs, [v["latency"]["p50_ms"] for v in vals], width, color=f"C{j}")
        axes[2].bar_label(
            b, labels=[f"{v['recall@10']:.3f}" for v in vals], fontsize=6, rotation=90, padding=2
        )
    for ax, label in zip(
        axes, ("build time, s", "batch QPS (all cores)", "1-query p50 ms (label: recall@10)"), strict=True
    ):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))])
        ax.set_xticklabels([d["name"].replace(" (all-MiniLM-L6-v2)", "") for d in datasets], fontsize=7)
        ax.set_ylabel(label)
        heights = [p.get_height() for p in ax.patches if p.get_height() > 0]
        if heights and max(heights) / min(heights) > 30:  # sizes or systems orders of magnitude apart
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    s = r["settings"]
    fig.suptitle(
        _title(
            r,
            f"ANN peers: M={s['connectivity']}, ef_construction={s['ef_construction']}, ef_search={s['ef_search']}"
            "; the systems of a data set side by side, data sets at different times (and machine loads)",
        ),
        fontsize=10,
    )
    _save(fig, "ann")


def peers() -> None:
    bi, li, rr = load("bi-encoder"), load("late-interaction-peers"), load("rerank")
    panels = [p for p in (bi, rr, li) if p is not None]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    k = 0
    if bi is not None:
        ax = axes[0][k]
        k += 1
        vals = {
            "Sieve ONNX": bi["texts_per_s"]["onnx"],
            "sentence-transformers": bi["texts_per_s"]["sentence_transformers"],
        }
        b = ax.bar(list(vals), list(vals.values()), color=["C0", "C1"])
        ax.bar_label(b, labels=[f"{v:.1f}" for v in vals.values()])
        ax.set_ylabel("texts/s (documents, batch 32)")
        ax.set_title(_title(bi, "bi-encoder: all-MiniLM-L6-v2"), fontsize=9)
    if rr is not None and "cross_encoder_backends" in rr:
        ax = axes[0][k]
        k += 1
        pps = rr["cross_encoder_backends"]["pairs_per_s"]
        vals = {
            "Sieve ONNX fp32": pps["onnx_fp32"],
            "Sieve ONNX int8": pps["onnx_int8"],
            "ST CrossEncoder": pps["st_torch_fp32"],
        }
        b = ax.bar(list(vals), list(vals.values()), color=["C0", "C2", "C1"])
        ax.bar_label(b, labels=[f"{v:.1f}" for v in vals.values()])
        ax.set_ylabel("pairs/s")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(_title(rr, f"cross-encoder (seeded MiniLM), {rr.get('queries')} queries"), fontsize=9)
    if li is not None:
        ax = axes[0][k]
        threads = li.get("threads", "T")
        names = {
            "sieve_redis": f"Sieve stage, blobs in Redis ({threads}t)",
            "sieve_memory": f"Sieve, blobs in memory ({threads}t)",
            "colbert-ai": f"colbert-ai ({threads}t)",
            "pylate": f"PyLate ({threads}t)",
            "sieve_memory_1t": "Sieve, blobs in memory (1t)",
            "colbert-ai_1t": "colbert-ai (1t)",
            "pylate_1t": "PyLate (1t)",
        }
        stats = li["ms_per_query"]
        keys = [s for s in names if s in stats][::-1]
        b = ax.barh(
            [names[s] for s in keys],
            [stats[s]["p50_ms"] for s in keys],
            color=["C0" if s.startswith("sieve") else "C1" for s in keys],
        )
        ax.bar_label(b, labels=[f"{stats[s]['p50_ms']:.0f}" for s in keys], fontsize=7, padding=2)
        ax.set_xlabel(f"ms per query, p50 ({li['candidates']} candidates)")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(_title(li, "warm late interaction (seeded ColBERT)"), fontsize=9)
    _save(fig, "peers")


def main() -> int:
    for plot in (quality, floor, concurrency, corpus, ann, peers):
        try:
            plot()
        except (
            KeyError,
            IndexError,
            TypeError,
            ValueError,
        ) as exc:  # a result of another shape: skip, say so
            print(f"plot {plot.__name__} skipped: {exc!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
