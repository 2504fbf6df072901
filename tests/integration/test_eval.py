"""BEIR metrics by hand, and `sieve eval --json` end to end on a small BEIR folder made here."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sieve_core.beir import evaluate, load_beir, mrr_at, ndcg_at, recall_at
from tests.conftest import ROOT, require_bundle


def test_metrics_by_hand() -> None:
    rel = {"a": 1, "b": 1}
    ranked = ["x", "a", "y", "b"]
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at(ranked, rel, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at(["a", "b"], rel, 10) == pytest.approx(1.0)
    assert ndcg_at(ranked, rel, 1) == 0.0
    assert recall_at(ranked, rel, 2) == 0.5 and recall_at(ranked, rel, 100) == 1.0
    assert mrr_at(ranked, rel, 10) == 0.5 and mrr_at(["x"], rel, 10) == 0.0
    # Graded relevance uses linear gains (trec_eval), and a missing run scores zero.
    assert ndcg_at(["b", "a"], {"a": 2, "b": 1}, 10) == pytest.approx(
        (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    )
    assert evaluate({"q1": ["a"]}, {"q1": {"a": 1}, "q2": {"b": 1}})["ndcg@10"] == pytest.approx(0.5)


TOPICS = {
    "volcano": "Volcanoes erupt when magma rises through the crust and lava flows out.",
    "piano": "The piano is a keyboard instrument whose hammers strike strings.",
    "insulin": "Insulin is a hormone that lowers blood sugar by moving glucose into cells.",
    "bitcoin": "Bitcoin is a cryptocurrency recorded on a public blockchain ledger.",
    "glacier": "Glaciers are slow rivers of ice that carve valleys over millennia.",
    "sourdough": "Sourdough bread is leavened by wild yeast and lactic acid bacteria.",
}
QUERIES = {
    "q-volcano": ("what happens when lava comes out of a mountain", "volcano"),
    "q-piano": ("instrument with keys and hammers", "piano"),
    "q-insulin": ("hormone regulating glucose levels", "insulin"),
    "q-bitcoin": ("digital currency on a blockchain", "bitcoin"),
    "q-glacier": ("moving ice sheets shaping valleys", "glacier"),
    "q-sourdough": ("bread made with natural yeast starter", "sourdough"),
}


def _write_beir(folder: Path) -> None:
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as fh:
        for doc_id, text in TOPICS.items():
            fh.write(json.dumps({"_id": doc_id, "title": doc_id.title(), "text": text}) + "\n")
        for i in range(40):  # distractors
            fh.write(
                json.dumps(
                    {"_id": f"noise-{i}", "title": "", "text": f"Meeting notes number {i} about budgets."}
                )
                + "\n"
            )
    with (folder / "queries.jsonl").open("w") as fh:
        for qid, (text, _) in QUERIES.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with (folder / "qrels" / "test.tsv").open("w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, (_, doc_id) in QUERIES.items():
            fh.write(f"{qid}\t{doc_id}\t1\n")


def test_load_beir(tmp_path: Path) -> None:
    _write_beir(tmp_path / "tiny")
    data = load_beir(tmp_path / "tiny")
    assert len(data.corpus) == 46 and len(data.queries) == 6
    assert data.corpus["piano"].startswith("Piano The piano")
    with pytest.raises(FileNotFoundError, match="qrels/dev.tsv is missing"):
        load_beir(tmp_path / "tiny", split="dev")


def test_sieve_eval_json_on_a_self_started_server(tmp_path: Path) -> None:
    require_bundle()
    _write_beir(tmp_path / "tiny")
    env = {"PATH": str(ROOT / ".venv" / "bin") + ":/usr/bin:/bin", "SIEVE_MODELS_DIR": str(ROOT / "models")}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'clients' / 'python'}"  # this tree's code (a worktree shares .venv)
    result = subprocess.run(
        [sys.executable, "-m", "sieve_cli.main", "eval", str(tmp_path / "tiny"), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # exactly one JSON document on stdout, nothing else
    assert report["documents"] == 46 and report["queries"] == 6
    (run,) = report["runs"]
    assert run["cascade"] == "retrieve 100"
    assert run["ndcg@10"] >= 0.9 and run["recall@100"] == 1.0 and run["mrr@10"] >= 0.9
    # The original contract's flat keys: the first configuration's metrics at the top level too.
    assert {k: report[k] for k in ("ndcg@10", "recall@100", "mrr@10", "cascade")} == {
        k: run[k] for k in ("ndcg@10", "recall@100", "mrr@10", "cascade")
    }
    assert "listening on" in result.stderr  # the self-started server's log went to stderr


def test_sieve_eval_with_late_interaction_on_a_self_started_service(tmp_path: Path) -> None:
    require_bundle()
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    _write_beir(tmp_path / "tiny")
    env = {"PATH": str(ROOT / ".venv" / "bin") + ":/usr/bin:/bin", "SIEVE_MODELS_DIR": str(ROOT / "models")}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'clients' / 'python'}"  # this tree's code (a worktree shares .venv)
    argv = [
        sys.executable,
        "-m",
        "sieve_cli.main",
        "eval",
        str(tmp_path / "tiny"),
        "--json",
        "--cascade",
        "retrieve",
        "--late-interaction",
        "--late-keep",
        "20",
    ]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # stdout holds the JSON object alone
    # Both configurations on the same index, each reported on its own.
    plain, late = report["runs"]
    assert plain["cascade"] == "retrieve 100" and "late_interaction" not in plain["stage_ms_p50"]
    assert late["cascade"] == "retrieve 100 > late_interaction 100"
    assert late["ndcg@10"] >= 0.9 and late["recall@100"] == 1.0
    assert late["stage_ms_p50"]["late_interaction"] > 0


@pytest.mark.parametrize("spec", ["cross+late", "late+late", "colbert", ""])
def test_sieve_eval_refuses_a_bad_cascade(spec: str, tmp_path: Path) -> None:
    from sieve_cli.main import main

    _write_beir(tmp_path / "tiny")
    assert main(["eval", str(tmp_path / "tiny"), "--cascade", spec]) == 2
