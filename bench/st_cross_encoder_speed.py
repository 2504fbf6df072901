"""sentence-transformers' CrossEncoder (PyTorch) on a checkpoint: scores and timings, for bench/rerank.py.

    python bench/st_cross_encoder_speed.py CHECKPOINT [--threads N] [--batch-size 16] [--pairs PAIRS.json]

Runs in its own process so that the benchmark process never imports torch. Two ways to use it:

- with --pairs (a JSON list of [query, document]): scores them once and prints one JSON object,
  {"scores": [...], "seconds": s, "pairs_per_s": r, ...};
- without --pairs (what bench/rerank.py does): loads the model, warms it up, prints one line
  {"ready": true, ...versions...}, then answers each stdin line {"query": q, "documents": [...]} with one
  stdout line {"scores": [...], "seconds": s}, until stdin closes. The benchmark sends a request in its
  turn of each round, so this runs interleaved with the ONNX variants on the same pairs.

`seconds` is the wall time of `CrossEncoder.predict` alone (tokenization included, as in the ONNX runner's
timing; the JSON round trip excluded). torch uses --threads intra-op threads and one inter-op thread, as
the ONNX sessions are configured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a folder CrossEncoder can load")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", type=Path, help="score these [query, document] pairs once and exit")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the import: only the local folder may be read
    out = sys.stdout

    # Library chatter goes to stderr: stdout carries only JSON.
    with contextlib.redirect_stdout(sys.stderr):
        import torch
        from sentence_transformers import CrossEncoder

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        with contextlib.suppress(RuntimeError):  # only possible before any parallel work
            torch.set_num_interop_threads(1)
        model = CrossEncoder(str(args.checkpoint), device="cpu", local_files_only=True)
        model.predict(
            [("warm up the re-ranker", "a short document"), ("warm up", "a second, longer document " * 8)],
            batch_size=args.batch_size,
            show_progress_bar=False,
        )

    def predict(pairs: list[tuple[str, str]]) -> tuple[list[float], float]:
        with contextlib.redirect_stdout(sys.stderr):
            started = time.perf_counter()
            scores = model.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)
            seconds = time.perf_counter() - started
        return [float(s) for s in scores], seconds

    info = {
        "torch": metadata.version("torch"),
        "sentence_transformers": metadata.version("sentence-transformers"),
        "transformers": metadata.version("transformers"),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_seq_length": model.max_seq_length,
        "activation": repr(model.activation_fn),
    }
    if args.pairs is not None:
        pairs = [(str(q), str(d)) for q, d in json.loads(args.pairs.read_text(encoding="utf-8"))]
        scores, seconds = predict(pairs)
        answer = {**info, "scores": scores, "seconds": seconds, "pairs_per_s": len(pairs) / seconds}
        out.write(json.dumps(answer) + "\n")
        return 0

    out.write(json.dumps({"ready": True, **info}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        scores, seconds = predict([(request["query"], d) for d in request["documents"]])
        out.write(json.dumps({"scores": scores, "seconds": seconds}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
