"""Reference cross-encoder scores from sentence-transformers itself, for the ONNX parity tests.

    python tests/reference/st_cross_encoder.py CHECKPOINT PAIRS.json [--batch-size N]
    python tests/reference/st_cross_encoder.py CHECKPOINT - < PAIRS.json

PAIRS.json is a JSON list of [query, document]. Prints one JSON object on stdout:
{"scores": [...], "max_seq_length": N, "activation": "..."}, the scores exactly as CrossEncoder.predict
returns them (its default activation included). Runs in its own process on purpose: the test process
stays torch-free, and no torch state from an export can touch the reference (DESIGN.md, "Export in a
separate process").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("checkpoint", type=Path, help="a folder CrossEncoder can load")
    parser.add_argument("pairs", help="JSON file of [query, document] pairs, or - for stdin")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the import: only the local folder may be read
    text = sys.stdin.read() if args.pairs == "-" else Path(args.pairs).read_text(encoding="utf-8")
    pairs = [tuple(pair) for pair in json.loads(text)]

    # Loading progress goes to stderr: stdout carries only the JSON answer.
    with contextlib.redirect_stdout(sys.stderr):
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(str(args.checkpoint), device="cpu", local_files_only=True)
        scores = model.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)
    answer = {
        "scores": [float(s) for s in scores],
        "max_seq_length": model.max_seq_length,
        "activation": repr(model.activation_fn),
    }
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
