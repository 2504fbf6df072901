"""A fast smoke test of the `make bench` code (no peers, no service, no measurement): the synthetic vectors
are deterministic and their exact top-k is right, the quick corpus subset keeps every judged document, and
bench/report.py renders README rows and bench/REPORT.md from results of every kind the sections write.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


SCRIPTS = ("run", "ann", "report", "scaling")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    # The bench scripts run as `python bench/x.py` and import each other by module name; they leave
    # sys.modules as they found it (their names are generic).
    monkeypatch.syspath_prepend(str(BENCH))
    yield {name: importlib.import_module(name) for name in SCRIPTS}
    for name in SCRIPTS:
        sys.modules.pop(name, None)


def test_synthetic_vectors_are_deterministic_and_exact_topk_is_right(bench: dict[str, ModuleType]) -> None:
    ann = bench["ann"]
    a, b = ann.synthetic(2000), ann.synthetic(2000)
    assert a.shape == (2000, 384) and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    queries = ann.synthetic_queries(2000, 20)
    assert not np.array_equal(queries, a[:20])
    top = ann.exact_topk(a, queries, k=10, block=7)
    brute = np.argsort(-(queries @ a.T), axis=1, kind="stable")[:, :10]
    assert ann.recall(top, brute) == 1.0


def test_quick_subset_keeps_every_judged_document(bench: dict[str, ModuleType]) -> None:
    scaling = bench["scaling"]
    from sieve_core.beir import BeirDataset

    corpus = {str(i): f"doc {i}" for i in range(50)}
    data = BeirDataset("t", corpus, {"q": "query"}, {"q": {"40": 1, "45": 1}})
    ids = scaling.subset_ids(data, 10)
    assert len(ids) == 10 and {"40", "45"} <= set(ids)
    assert ids == [d for d in corpus if d in set(ids)]  # corpus order kept


def _results(floor_timings: tuple[str, ...]) -> dict[str, dict]:  # type: ignore[type-arg]
    lat = {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "mean_ms": 1.5, "samples": 10}
    common = {"command": "python bench/x.py", "mode": "quick", "date": "2026-01-01", "wall_s": 1.0}
    machine = {"machine": {"cpus": 2, "loadavg": [1.0], "python": "3.11", "versions": {"numpy": "2"}}}
    system = {"build_s": 1.0, "qps": 100.0, "latency": lat, "recall@10": 0.99, "bytes_per_vector": 1600.0}
    p50 = {k: 1.0 for k in floor_timings}  # what bench/scaling.py's floor section records
    run = {"spec": "retrieve", "cascade": "retrieve 100", "ndcg@10": 0.6, "recall@100": 0.9, "mrr@10": 0.5}
    shared = {"dataset": "scifact", "corpus": "subset", "documents": 800, "queries": 300}
    kinds = {
        "quality-scifact": {
            "benchmark": "quality",
            **shared,
            "index_job_docs_per_s": 20.0,
            "runs": [{**run, "search_queries_per_s": 10.0, "stage_ms_p50": {"retrieve": 5.0}}],
        },
        "floor": {
            "benchmark": "floor",
            **shared,
            "p50_ms": p50,
            "p99_ms": p50,
            "overhead_share_p50": dict.fromkeys(
                ("retrieve_request", "retrieve_stage_in_server", "late_request", "late_interaction_stage"),
                0.1,
            ),
            "definitions": {"retrieve_client": "x"},
        },
        "concurrency": {
            "benchmark": "concurrency",
            **shared,
            "request": "r",
            "caches": "c",
            "client": "c",
            "passes": [
                {
                    "cascade": c,
                    "clients": n,
                    "requests": 10,
                    "completed": 10,
                    "errors": {},
                    "degraded": 0,
                    "throughput_qps": 5.0,
                    **lat,
                }
                for c in ("retrieve", "late")
                for n in (1, 64)
            ],
        },
        "scaling-corpus": {
            "benchmark": "scaling-corpus",
            "what": "w",
            "sizes": [
                {
                    "vectors": 10000,
                    "top10": lat,
                    "top100": lat,
                    "recall@10": 0.99,
                    "threads": [{"threads": 1, "qps": 10.0}],
                    "index_file_bytes_per_vector": 1700.0,
                }
            ],
        },
        "ann": {
            "benchmark": "ann",
            "settings": {
                "connectivity": 16,
                "ef_construction": 200,
                "ef_search": 256,
                "k": 10,
                "threads": 2,
                "latency": "l",
            },
            "datasets": [
                {
                    "name": "synthetic 20,000",
                    "vectors": 20000,
                    "dims": 384,
                    "queries": 10,
                    "systems": {k: system for k in ("exact", "usearch_cos", "usearch_ip", "faiss_hnsw")},
                },
                {
                    "name": "synthetic 100,000",
                    "vectors": 100000,
                    "dims": 384,
                    "queries": 10,
                    "rounds": 3,
                    "systems": {
                        "exact": system,
                        **{
                            k: {**system, "rss_bytes_per_vector": 1700.0}
                            for k in ("usearch_cos", "faiss_hnsw")
                        },
                    },
                    "paired": {
                        "build_time_usearch_cos_over_faiss": 1.5,
                        "qps_usearch_cos_over_faiss": 0.4,
                        "latency_usearch_cos_over_faiss": 2.0,
                        "qps_usearch_cos_over_exact": 3.0,
                    },
                },
            ],
        },
        "bi-encoder": {
            "benchmark": "bi-encoder",
            "dataset": "scifact",
            "model": "m",
            "texts_per_round": 64,
            "rounds": 2,
            "batch_size": 32,
            "max_length": 256,
            "threads": 2,
            "texts_per_s": {"onnx": 20.0, "sentence_transformers": 18.0},
            "onnx_over_st": 1.1,
            "single_text_latency": {"onnx": lat, "sentence_transformers": lat},
            "cosine_onnx_vs_st": {"min": 0.99999, "mean": 1.0},
            "sentence_transformers_process": {},
        },
        "late-interaction-peers": {
            "benchmark": "late-interaction-peers",
            "model_note": "seeded",
            "queries": 3,
            "candidates": 100,
            "candidate_source": "s",
            "threads": 2,
            "pylate": "skipped",
            "ms_per_query": {"sieve_redis": lat, "colbert-ai": lat},
            "documents_per_s": {"sieve": 10.0, "colbert-ai": 8.0},
            "agreement_vs_sieve": {"colbert-ai": {"spearman_mean": 0.999}},
        },
        "run": {"benchmark": "run", "sections": [{"section": "ann", "status": "ok", "seconds": 1.0}]},
    }
    return {name: {**common, **r, **machine} for name, r in kinds.items()}


def test_report_renders_every_kind(
    bench: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = bench["report"]
    results = _results(bench["scaling"].FLOOR_TIMINGS)
    for name, r in results.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "QUICK", tmp_path / "quick")
    monkeypatch.setattr(report, "PLOTS", tmp_path / "plots")
    monkeypatch.setattr(report, "REPORT", tmp_path / "REPORT.md")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    rows = report._rows()
    # A row per kind naming its command, and one per ANN data set (two here).
    assert sum("python bench/x.py" in row for row in rows) == len(results) + 1
    report.write_report()
    text = (tmp_path / "REPORT.md").read_text()
    for heading in (
        "Quality through gRPC",
        "physical floor",
        "Client concurrency",
        "Corpus size",
        "ANN",
        "Bi-encoder",
    ):
        assert heading in text
    assert "rerank.json is not recorded yet" in text  # the cross-encoder section, whose result is absent
    assert "usearch cos f32 / FAISS, paired: build time x1.50" in "\n".join(rows)


def test_quick_results_never_replace_full_ones(
    bench: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/run.py --quick writes results/quick/; the report prefers a full result of the same name, shows
    a quick-only one labelled as such, and lists both make-bench wall times."""
    run, report = bench["run"], bench["report"]
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "QUICK_RESULTS", tmp_path / "quick")
    results = _results(bench["scaling"].FLOOR_TIMINGS)
    for name in ("bi-encoder", "run"):
        full = {
            k: v
            for k, v in results[name].items()
            if k not in ("command", "mode", "date", "wall_s", "machine")
        }
        run.write_result(name, dict(full), command="python bench/full.py", quick=False, started=0.0)
    for name in ("bi-encoder", "run", "late-interaction-peers"):
        quick = {
            k: v
            for k, v in results[name].items()
            if k not in ("command", "mode", "date", "wall_s", "machine")
        }
        run.write_result(name, dict(quick), command="python bench/quick.py", quick=True, started=0.0)
    assert json.loads((tmp_path / "bi-encoder.json").read_text())["mode"] == "full"
    assert json.loads((tmp_path / "quick" / "bi-encoder.json").read_text())["mode"] == "quick"

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "QUICK", tmp_path / "quick")
    monkeypatch.setattr(report, "PLOTS", tmp_path / "plots")
    monkeypatch.setattr(report, "REPORT", tmp_path / "REPORT.md")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    rows = report._rows()
    bi = [r for r in rows if "bi-encoder all-MiniLM-L6-v2" in r]
    assert len(bi) == 1 and "[full run]" in bi[0] and "bench/full.py" in bi[0]
    late = [r for r in rows if "warm late interaction" in r]
    assert len(late) == 1 and "[quick run]" in late[0]
    assert any("`make bench` wall time" in r for r in rows)
    assert any("`make bench-quick` wall time" in r for r in rows)
    report.write_report()
    text = (tmp_path / "REPORT.md").read_text()
    assert "Last complete full" in text and "Last complete quick" in text


def test_ann_compare_side_by_side(bench: dict[str, ModuleType]) -> None:
    """The ANN comparison on a tiny corpus: every system measured, the paired ratios recorded."""
    pytest.importorskip("faiss")
    ann = bench["ann"]
    corpus, queries = ann.synthetic(3000), ann.synthetic_queries(3000, 20)
    entry = ann.compare("tiny", corpus, queries, 1, 10, 2, False, False)
    assert set(entry["systems"]) == {
        "exact",
        "usearch_cos",
        f"sieve_{ann._DEFAULTS.index_storage}",
        "faiss_hnsw",
    }
    for name, r in entry["systems"].items():
        assert len(r["qps_rounds"]) == 2 and r["latency"]["samples"] == 10, name
        assert 0.8 <= r["recall@10"] <= 1.0, name  # ef_search 256 over 3,000 vectors: nearly exact
    assert entry["systems"]["usearch_cos"]["build_s"] > 0 and entry["systems"]["faiss_hnsw"]["build_s"] > 0
    assert all(v > 0 for v in entry["paired"].values())
