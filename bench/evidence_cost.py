"""What evidence spans cost a late-interaction search, in-process: MaxSim over 100 stored SciFact documents
(default format, with spans), by the integer product the server uses and by float32 products (the fallback
on a CPU without an exact integer product; `maxsim_float`), the same keeping the argmax, and the evidence of all 100 hits (a reply with
top_k 100 carries them all): hit by hit (`evidence_spans`) and as the server works it out, all hits in one
pass (`evidence_spans_many`, checked equal). Medians over the test queries, one BLAS thread as the server
runs.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/evidence_cost.py ../shared/datasets/scifact [--docs 100]

Records bench/results/evidence_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import command_line, write_result  # noqa: E402

from sieve_core import kernels  # noqa: E402
from sieve_core.beir import load_beir  # noqa: E402
from sieve_core.evidence import evidence_spans, evidence_spans_many  # noqa: E402
from sieve_core.late_interaction import BestMatches, maxsim_blobs  # noqa: E402
from sieve_core.models.bi_encoder import BiEncoderRunner  # noqa: E402
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress_many, prepare_query  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    started = time.monotonic()
    if not (args.beir / "corpus.jsonl").is_file():
        print(f"skipped: {args.beir} is not a BEIR folder", file=sys.stderr)
        return 0
    data = load_beir(args.beir)
    texts = [data.corpus[d] for d in list(data.corpus)[: args.docs]]
    queries = list(data.queries.values())[: args.queries]
    runner = BiEncoderRunner(ROOT / "models" / "all-MiniLM-L6-v2")
    _, rows = runner.encode(texts, tokens=True)
    assert rows is not None
    blobs = compress_many(rows, DEFAULT_TOKEN_FORMAT, runner.token_offsets(texts))
    times: dict[str, list[float]] = {
        "maxsim": [],
        "maxsim_float": [],
        "maxsim_with_argmax": [],
        "evidence_all_hits": [],
        "evidence_all_hits_one_pass": [],
    }
    spans = 0
    for query in queries:
        q = prepare_query(runner.encode([query], tokens=True)[1][0], DEFAULT_TOKEN_FORMAT)  # type: ignore[index]
        t = time.perf_counter()
        integer = maxsim_blobs(q, blobs)
        times["maxsim"].append((time.perf_counter() - t) * 1000)
        integer_product, kernels.available = (
            kernels.available,
            lambda: False,
        )  # the float path, as without VNNI
        try:
            t = time.perf_counter()
            floats = maxsim_blobs(q, blobs)
            times["maxsim_float"].append((time.perf_counter() - t) * 1000)
        finally:
            kernels.available = integer_product
        assert abs(integer - floats).max() < 0.05, "integer and float MaxSim disagree"
        best: list[BestMatches | None] = [None] * len(blobs)
        t = time.perf_counter()
        maxsim_blobs(q, blobs, best=best)
        times["maxsim_with_argmax"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        for blob, match in zip(blobs, best, strict=True):
            if match is not None:
                spans += len(evidence_spans(blob, match))
        times["evidence_all_hits"].append((time.perf_counter() - t) * 1000)
        matches = [(blob, match) for blob, match in zip(blobs, best, strict=True) if match is not None]
        t = time.perf_counter()
        at_once = evidence_spans_many(matches)
        times["evidence_all_hits_one_pass"].append((time.perf_counter() - t) * 1000)
        assert at_once == [evidence_spans(blob, match) for blob, match in matches]
    result = {
        "benchmark": "evidence_cost",
        "documents": len(blobs),
        "queries": len(queries),
        "format": DEFAULT_TOKEN_FORMAT.describe(),
        "integer_product": kernels.available(),
        "spans_per_hit": spans / (len(queries) * len(blobs)),
        **{f"{k}_p50_ms": statistics.median(v) for k, v in times.items()},
    }
    for key in [k for k in result if k.endswith("_p50_ms")]:
        print(f"{key}: {result[key]:.2f}")
    write_result(
        "evidence_cost",
        result,
        command=command_line("bench/evidence_cost.py", sys.argv[1:]),
        quick=False,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
