"""Where a late-interaction search's time goes, against retrieval alone, on a real `sieve serve`.

    .venv/bin/python bench/late_overhead.py [--beir ../shared/datasets/scifact] [--data-dir DIR]
        [--baseline CODE_DIR] [--limit-queries N] [--rounds 2]

The searches are `sieve eval`'s (sieve_cli/evaluate.py: `--cascade retrieve` and `--cascade late`, top 100,
ids only, evidence spans on every late hit), taking turns query by query (the order rotating), over the full
corpus in the collection `bench/explain.py service` indexes (`--data-dir` reuses one it kept, e.g. after
`bench/explain.py service --data-dir DIR`; without it the corpus is indexed here first, 15-25 minutes).
No Redis: every search embeds its query. Per search, with the response read as raw bytes:

  client     the call's wall time at the client (sent -> bytes received), and the protobuf parse after it;
  server     the reply's took_ms (the engine's time: planning, stages, the reply's copies and evidence);
  stages     each stage's took_ms (retrieve: the encoder pass, the index search, the store lookup; late
             interaction: token blobs read, MaxSim, ranking);
  derived    reply = took_ms - the stages (the reply's hits and their evidence spans); outside = client
             call - took_ms (gRPC in and out, the servicer's protobuf building, the interceptors).

`--baseline CODE_DIR` (another checkout, e.g. `git archive <commit> | tar -x -C CODE_DIR`) starts a second
`sieve serve` from that code on a copy of the data directory; the four kinds of search (each code, retrieve
and late) then take turns query by query, so that before and after are measured in the same minutes.
Medians per component, differences, searches/s ratios, and nDCG@10 of every run (a change in the path must
not move it). Writes bench/results/late_overhead.json (with --limit-queries: bench/results/quick/).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from explain import index
from run import DEFAULT_BEIR, ROOT, command_line, log, write_result
from sieve.v1 import common_pb2, search_pb2

from sieve_cli import stack
from sieve_cli.evaluate import EvalOptions, cascade_settings
from sieve_core.beir import evaluate, load_beir

COLLECTION = "explain-bench"  # bench/explain.py's, so that a data dir it kept serves here too
SPECS = ("retrieve", "late")
SEARCH = "/sieve.v1.SearchService/Search"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


@contextlib.contextmanager
def baseline_server(code: Path, data_dir: Path) -> Iterator[str]:
    """`sieve serve` from another checkout (its own code first on the path), on `data_dir`."""
    address = f"127.0.0.1:{stack.free_port()}"
    env = stack.clean_env(
        SIEVE_DATA_DIR=str(data_dir),
        SIEVE_GRPC_ADDRESS=address,
        SIEVE_METRICS_ADDRESS="",
        SIEVE_MODELS_DIR=str((ROOT / "models").resolve()),
        SIEVE_LOG_LEVEL="WARNING",
        PYTHONPATH=f"{code}:{code / 'clients' / 'python'}",
    )
    proc = subprocess.Popen([sys.executable, "-m", "sieve_cli.main", "serve"], cwd=code, env=env)
    try:
        stack.wait_serving(address, 300, proc)
        yield address
    finally:
        proc.terminate()
        proc.wait(90)


def measure(
    arms: dict[str, tuple[grpc.Channel, str]], queries: dict[str, str], rounds: int
) -> tuple[
    dict[str, dict[str, list[float]]], dict[str, dict[str, list[str]]], dict[str, dict[str, list[object]]]
]:
    """Every query through every arm (a server and a cascade), in turns; per arm, per component, the
    milliseconds of each call; and the first round's ids, and whole hits (ids, scores, stage scores,
    evidence spans), per arm and query."""
    opts = EvalOptions(folder=Path("."))
    calls = {
        name: (
            channel.unary_unary(SEARCH, request_serializer=search_pb2.SearchRequest.SerializeToString),
            spec,
        )
        for name, (channel, spec) in arms.items()
    }
    times: dict[str, dict[str, list[float]]] = {name: {} for name in arms}
    ids: dict[str, dict[str, list[str]]] = {name: {} for name in arms}
    replies: dict[str, dict[str, list[object]]] = {name: {} for name in arms}
    names = list(arms)
    n = 0
    for round_ in range(rounds):
        for qid, text in queries.items():
            n += 1
            for name in names[n % len(names) :] + names[: n % len(names)]:
                call, spec = calls[name]
                request = search_pb2.SearchRequest(
                    collection=COLLECTION,
                    query=text,
                    top_k=100,
                    omit_documents=True,
                    settings=cascade_settings(spec, opts),
                )
                t0 = time.perf_counter()
                raw = call(request, timeout=120)
                t1 = time.perf_counter()
                response = search_pb2.SearchResponse.FromString(raw)
                t2 = time.perf_counter()
                add = times[name].setdefault
                add("client call", []).append((t1 - t0) * 1000)
                add("client parse", []).append((t2 - t1) * 1000)
                add("server took_ms", []).append(response.took_ms)
                staged = 0.0
                for report in response.stages:
                    if report.status == search_pb2.STAGE_STATUS_COMPLETED:
                        stage = common_pb2.Stage.Name(report.stage).removeprefix("STAGE_").lower()
                        add(f"stage {stage}", []).append(report.took_ms)
                        staged += report.took_ms
                add("reply (took - stages)", []).append(response.took_ms - staged)
                add("outside (call - took)", []).append((t1 - t0) * 1000 - response.took_ms)
                add("response KB", []).append(len(raw) / 1000)
                add("evidence spans", []).append(sum(len(h.evidence) for h in response.hits))
                if round_ == 0:
                    ids[name][qid] = [h.id for h in response.hits]
                    replies[name][qid] = [
                        (
                            h.id,
                            h.score,
                            [(s.stage, s.score, s.rank) for s in h.stage_scores],
                            list(h.evidence),
                        )
                        for h in response.hits
                    ]
        log(f"round {round_ + 1}/{rounds} done (load {os.getloadavg()[0]:.1f})")
    return times, ids, replies


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    row = {k: statistics.median(v) for k, v in times.items()}
    row["searches/s"] = (
        1000 * len(times["client call"]) / (sum(times["client call"]) + sum(times["client parse"]))
    )
    return row


def print_table(rows: dict[str, dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    width = max(len(k) for k in keys)
    print(f"{'median':<{width}}" + "".join(f"  {name:>16}" for name in rows))
    for key in keys:
        print(f"{key:<{width}}" + "".join(f"  {row.get(key, 0.0):16.2f}" for row in rows.values()))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--beir", type=Path, default=DEFAULT_BEIR)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare against")
    parser.add_argument("--limit-queries", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    started = time.monotonic()
    if not (args.beir / "corpus.jsonl").is_file():
        print(f"skipped: {args.beir} is not a BEIR folder", file=sys.stderr)
        return 0
    data = load_beir(args.beir)
    queries = dict(list(data.queries.items())[: args.limit_queries or None])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="late-overhead-") as work, contextlib.ExitStack() as stack_:
        data_dir = args.data_dir or Path(work) / "data"
        settings = {"SIEVE_LOG_LEVEL": "WARNING"}
        served = stack_.enter_context(
            stack.sieve_process("serve", data_dir=data_dir, settings=settings, timeout_s=300)
        )
        log(f"sieve serve pid {served.proc.pid} on {served.address}")
        channel = stack_.enter_context(grpc.insecure_channel(served.address, options=CHANNEL_OPTIONS))
        index(channel, data.corpus)
        servers = {"": channel}
        if args.baseline is not None:
            copy = Path(work) / "baseline-data"
            shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("redis", "run", "server-id"))
            address = stack_.enter_context(baseline_server(args.baseline.resolve(), copy))
            servers = {
                "base ": stack_.enter_context(grpc.insecure_channel(address, options=CHANNEL_OPTIONS)),
                "new ": channel,
            }
        arms = {f"{label}{spec}": (ch, spec) for label, ch in servers.items() for spec in SPECS}
        if args.warmup:
            measure(arms, dict(list(data.queries.items())[-args.warmup :]), 1)
        times, ids, replies = measure(arms, queries, args.rounds)
    rows = {name: summarize(t) for name, t in times.items()}
    ndcg = {
        name: evaluate(run, {q: data.qrels[q] for q in run if q in data.qrels})["ndcg@10"]
        for name, run in ids.items()
    }
    print_table(rows)
    ratios = {}
    for label in servers:
        late, retrieve = rows[f"{label}late"], rows[f"{label}retrieve"]
        ratios[label.strip() or "this code"] = late["searches/s"] / retrieve["searches/s"]
        extra = late["client call"] - retrieve["client call"]
        print(
            f"{label or 'this code '}: late/retrieve searches/s {ratios[label.strip() or 'this code']:.2f}, late costs +{extra:.1f} ms a search"
        )
    print("nDCG@10: " + ", ".join(f"{name} {v:.4f}" for name, v in ndcg.items()))
    # Before and after must answer alike: the same hits, scores, stage scores and evidence spans.
    differing = {
        spec: sum(replies[f"base {spec}"][q] != replies[f"new {spec}"][q] for q in queries)
        for spec in SPECS
        if args.baseline is not None
    }
    if differing:
        print(
            "queries whose reply differs between the two codes (hits, scores, spans): "
            + ", ".join(f"{spec} {n}/{len(queries)}" for spec, n in differing.items())
        )
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    write_result(
        "late_overhead",
        {
            "queries": len(queries),
            "rounds": args.rounds,
            "baseline": str(args.baseline) if args.baseline else None,
            "medians_ms": rows,
            "late_over_retrieve_searches_per_s": ratios,
            "ndcg@10": ndcg,
            "replies_differing_from_baseline": differing,
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        command=command_line("bench/late_overhead.py", sys.argv[1:]),
        quick=bool(args.limit_queries),
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
