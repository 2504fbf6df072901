"""Run `sieve eval BEIR_DIR --json [options]` and record its result in bench/results/ for the README.

.venv/bin/python bench/record_eval.py ../shared/datasets/scifact [--cascade retrieve --cascade late ...]

One file per cascade configuration: bench/results/eval-<dataset>-<spec>.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if not (Path(argv[0]) / "corpus.jsonl").is_file():
        print(f"skipped: {argv[0]} is not a BEIR folder", file=sys.stderr)
        return 0
    command = ["sieve", "eval", *argv, "--json"]
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "sieve"), *command[1:]],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    shared = {k: v for k, v in result.items() if k != "runs"}
    for run in result["runs"]:
        record = {"benchmark": "eval", "command": " ".join(command), **shared, **run}
        suffix = {"retrieve": "retrieve", "late": "late-interaction"}.get(
            run["spec"], run["spec"].replace("+", "-")
        )
        path = ROOT / "bench" / "results" / f"eval-{result['dataset']}-{suffix}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"nDCG@10 {run['ndcg@10']:.4f} ({run['cascade']}); wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
