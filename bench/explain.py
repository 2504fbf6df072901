"""Issue 15's measured acceptance: evidence bytes, SearchStream's first message, latency budgets.

    .venv/bin/python bench/explain.py bytes  [--beir DIR] [--limit-docs N]
    .venv/bin/python bench/explain.py service [--beir DIR] [--limit-docs N] [--limit-queries N] [--budget-ms 40]
        [--client aio|sync] [--data-dir DIR]

bytes    in-process, no server: SciFact documents (a seeded sample of N, default all) through
         BiEncoderRunner -> compress in the default format, with and without the evidence spans section
         (codec version 3): bytes per document (mean, p50, p99) and what the spans add. Target: the default
         format with spans stays <= 25 KB per SciFact document.
service  one `sieve run` (its own Redis, its workers, the server; a seeded cross-encoder exported into a
         private models folder, as tests/integration/test_full_cascade.py does: no trained cross-encoder is
         reachable here) with the corpus upserted into a collection that stores token vectors (default
         format). Then, for every test query, interleaved (the order swapped every other query):
           retrieve   Search, retrieval only (100 candidates, top 10): client latency;
           stream     SearchStream with late interaction (100 candidates, top 10): time to the first
                      message and to the final one;
           search     Search with the same request: its ranking must equal the stream's final message.
         Target: first-message p50 <= 1.2 x retrieve p50 (same run); every final ranking equal.
         Then the budget run on as many train-split queries (distinct: nothing cached): retrieve 100 ->
         late interaction keeps 30 -> cross-encoder keeps 10, both BEST_EFFORT, `latency_budget_ms` 40;
         the first `--warmup` train queries teach the server its stage costs and are reported apart.
         Target: p95 client latency <= 44 ms, and every stage the budget cut or skipped says so (a cut:
         candidates_cut_from and a plan; a skip or a stop: DEGRADED with a reason naming the budget or the
         time). Also recorded: how often each stage completed, was cut or skipped, and where the time goes
         (medians of the client's latency, the server's took_ms and each stage's, for all searches and for
         the slowest 10 %).
         --data-dir DIR keeps the server's data, so a second run reuses the indexed collection (indexing
         full SciFact takes 15-25 minutes here); its Redis starts empty each run (no cached query encodings).

Writes bench/results/explain-bytes.json and bench/results/explain-service.json (with --limit-*: results/quick/).
A missed target prints MISSED with its figure; the targets are the issue's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from run import DEFAULT_BEIR, ROOT, build_seeded, command_line, log, percentiles, write_result
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from sieve_cli import stack
from sieve_cli.stack import free_port
from sieve_core.beir import load_beir

MODEL = "all-MiniLM-L6-v2"
CROSS = "ce-seeded-minilm"
COLLECTION = "explain-bench"
BATCH = 64
TOP_K = 10
MAX_DOC_BYTES = 25_000
FIRST_OVER_RETRIEVE = 1.2
BUDGET_P95_SLACK_MS = 4.0  # the issue: a 40 ms budget, p95 <= 44 ms


def _verdict(name: str, ok: bool, figure: str) -> dict[str, Any]:
    log(f"{name}: {figure} {'ok' if ok else 'MISSED'}")
    return {"figure": figure, "met": ok}


# -- bytes ------------------------------------------------------------------------------------------------


def bytes_section(beir: Path, limit: int | None) -> dict[str, Any]:
    from sieve_core.models.bi_encoder import BiEncoderRunner
    from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress

    data = load_beir(beir)
    ids = sorted(data.corpus)
    if limit:
        ids = random.Random(0).sample(ids, limit)
    runner = BiEncoderRunner(ROOT / "models" / MODEL)
    plain, spans, tokens = [], [], []
    for start in range(0, len(ids), BATCH):
        texts = [data.corpus[i] for i in ids[start : start + BATCH]]
        rows = runner.token_vectors(texts)
        offsets = runner.token_offsets(texts)
        for r, o in zip(rows, offsets, strict=True):
            plain.append(len(compress(r, DEFAULT_TOKEN_FORMAT)))
            spans.append(len(compress(r, DEFAULT_TOKEN_FORMAT, o)))
            tokens.append(len(r))
    with_spans, without = np.array(spans), np.array(plain)
    added = with_spans - without

    def stats(a: np.ndarray) -> dict[str, float]:
        return {"mean": float(a.mean()), "p50": float(np.median(a)), "p99": float(np.percentile(a, 99))}

    result = {
        "documents": len(ids),
        "format": DEFAULT_TOKEN_FORMAT.describe(),
        "tokens_per_doc": stats(np.array(tokens)),
        "bytes_without_spans": stats(without),
        "bytes_with_spans": stats(with_spans),
        "spans_added_bytes": stats(added),
        "spans_added_bytes_per_token": float(added.sum() / max(sum(tokens), 1)),
        "spans_added_fraction": float(added.sum() / without.sum()),
    }
    result["target_bytes_per_doc"] = _verdict(
        "default format with spans, mean bytes per document <= 25 KB",
        result["bytes_with_spans"]["mean"] <= MAX_DOC_BYTES,
        f"{result['bytes_with_spans']['mean']:.0f} B (without spans {result['bytes_without_spans']['mean']:.0f} B, "
        f"spans +{result['spans_added_bytes']['mean']:.0f} B = {100 * result['spans_added_fraction']:.1f} %)",
    )
    return result


# -- the service ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sieve_run(data_dir: Path, models_dir: Path, log_path: Path) -> Iterator[str]:
    """`sieve run` (Redis, workers incl. cross_encoder, server) on free ports (sieve_cli.stack); stopped on exit."""
    settings = {
        "SIEVE_MODELS_DIR": str(models_dir),
        "SIEVE_LOCAL_REDIS_PORT": str(free_port()),
        "SIEVE_CROSS_ENCODER_MODEL": CROSS,
        "SIEVE_LOG_LEVEL": "WARNING",
    }
    with stack.sieve_process(
        "run", data_dir=data_dir, settings=settings, log=log_path, timeout_s=300
    ) as served:
        yield served.address


def models_folder(work: Path) -> Path:
    """A models folder with the bi-encoder and the seeded cross-encoder (bench/run.py builds and caches it)."""
    _, bundle = build_seeded(CROSS)
    folder = work / "models"
    folder.mkdir()
    (folder / MODEL).symlink_to((ROOT / "models" / MODEL).resolve())
    (folder / CROSS).symlink_to(bundle.resolve())
    return folder


def index(channel: grpc.Channel, corpus: dict[str, str]) -> float:
    """Upserts the corpus into a new collection; 0.0 when a kept data folder (--data-dir) holds it already."""
    collections = collections_pb2_grpc.CollectionServiceStub(channel)
    documents = documents_pb2_grpc.DocumentServiceStub(channel)
    with contextlib.suppress(grpc.RpcError):
        found = collections.GetCollection(collections_pb2.GetCollectionRequest(name=COLLECTION), timeout=60)
        if found.collection.document_count == len(corpus):
            log(f"reusing the indexed collection ({len(corpus)} documents)")
            return 0.0
        raise SystemExit(
            f"{COLLECTION!r} in the kept data folder holds another corpus: use another --data-dir"
        )
    spec = collections_pb2.Collection(name=COLLECTION, token_storage=collections_pb2.TokenStorage())
    collections.CreateCollection(collections_pb2.CreateCollectionRequest(collection=spec), timeout=60)
    started = time.perf_counter()
    items = sorted(corpus.items())
    for start in range(0, len(items), BATCH):
        batch = [documents_pb2.Document(id=i, text=t) for i, t in items[start : start + BATCH]]
        documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=batch), timeout=600
        )
    return time.perf_counter() - started


def _request(query: str, settings: common_pb2.SearchSettings) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(collection=COLLECTION, query=query, top_k=TOP_K, settings=settings)


RETRIEVE = common_pb2.SearchSettings(
    retrieve_candidates=100,
    late_interaction=common_pb2.STAGE_MODE_OFF,
    cross_encoder=common_pb2.STAGE_MODE_OFF,
)
LATE = common_pb2.SearchSettings(
    retrieve_candidates=100,
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT,
    late_interaction_keep=100,
    cross_encoder=common_pb2.STAGE_MODE_OFF,
)


CASCADE = common_pb2.SearchSettings(
    retrieve_candidates=100,
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT,
    late_interaction_keep=30,
    cross_encoder=common_pb2.STAGE_MODE_BEST_EFFORT,
    cross_encoder_keep=TOP_K,
)


def _ranking(response: search_pb2.SearchResponse) -> list[tuple[str, float, tuple[Any, ...]]]:
    return [(h.id, h.score, tuple((s.start, s.end, s.score) for s in h.evidence)) for h in response.hits]


def stream_section(address: str, queries: list[str], client: str) -> dict[str, Any]:
    """Times with the asyncio gRPC client (as sieve.AsyncSieveClient and the TypeScript client stream) or
    the blocking one (`--client sync`: its streaming iterator hands messages over from a thread)."""
    retrieve_ms, first_ms, final_ms, search_ms, mismatches, messages = [], [], [], [], [], []
    server_retrieve_ms, server_first_ms = [], []  # the server's took_ms: transport and client apart

    def record_stream(got: list[Any], answer: search_pb2.SearchResponse, query: str) -> None:
        messages.append(len(got))
        if not got[-1].final or _ranking(got[-1].result) != _ranking(answer):
            mismatches.append(query)

    async def run_aio() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for n, query in enumerate(queries):

                async def retrieve(query: str = query) -> None:
                    started = time.perf_counter()
                    answer = await stub.Search(_request(query, RETRIEVE), timeout=30)
                    retrieve_ms.append((time.perf_counter() - started) * 1000)
                    server_retrieve_ms.append(answer.took_ms)

                async def stream(query: str = query) -> None:
                    started = time.perf_counter()
                    got: list[Any] = []
                    async for message in stub.SearchStream(_request(query, LATE), timeout=30):
                        if not got:
                            first_ms.append((time.perf_counter() - started) * 1000)
                            server_first_ms.append(message.result.took_ms)
                        got.append(message)
                    final_ms.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    answer = await stub.Search(_request(query, LATE), timeout=30)
                    search_ms.append((time.perf_counter() - started) * 1000)
                    record_stream(got, answer, query)

                for step in (retrieve, stream) if n % 2 == 0 else (stream, retrieve):
                    await step()

    def run_sync() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for n, query in enumerate(queries):

                def retrieve(query: str = query) -> None:
                    started = time.perf_counter()
                    answer = stub.Search(_request(query, RETRIEVE), timeout=30)
                    retrieve_ms.append((time.perf_counter() - started) * 1000)
                    server_retrieve_ms.append(answer.took_ms)

                def stream(query: str = query) -> None:
                    started = time.perf_counter()
                    got = []
                    for message in stub.SearchStream(_request(query, LATE), timeout=30):
                        if not got:
                            first_ms.append((time.perf_counter() - started) * 1000)
                            server_first_ms.append(message.result.took_ms)
                        got.append(message)
                    final_ms.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    answer = stub.Search(_request(query, LATE), timeout=30)
                    search_ms.append((time.perf_counter() - started) * 1000)
                    record_stream(got, answer, query)

                for step in (retrieve, stream) if n % 2 == 0 else (stream, retrieve):
                    step()

    if client == "aio":
        asyncio.run(run_aio())
    else:
        run_sync()
    result = {
        "queries": len(queries),
        "client": client,
        "retrieve_only": percentiles(retrieve_ms),
        "stream_first_message": percentiles(first_ms),
        "stream_final_message": percentiles(final_ms),
        "server_took_retrieve_only": percentiles(server_retrieve_ms),
        "server_took_first_message": percentiles(server_first_ms),
        "search_late_interaction": percentiles(search_ms),
        "messages_per_stream": sorted(set(messages)),
        "final_differs_from_search": len(mismatches),
        "differing_queries": mismatches[:5],
    }
    ratio = result["stream_first_message"]["p50_ms"] / result["retrieve_only"]["p50_ms"]
    result["first_over_retrieve_p50"] = ratio
    result["target_first_message"] = _verdict(
        "SearchStream first message p50 <= 1.2 x retrieve-only p50",
        ratio <= FIRST_OVER_RETRIEVE,
        f"{result['stream_first_message']['p50_ms']:.2f} ms / {result['retrieve_only']['p50_ms']:.2f} ms = {ratio:.2f}",
    )
    result["target_final_equals_search"] = _verdict(
        "final message's ranking equals Search's",
        not mismatches,
        f"{len(mismatches)} of {len(queries)} differ",
    )
    return result


def _says_why(report: search_pb2.StageReport) -> bool:
    """A stage the budget touched says so: cut (candidates_cut_from + plan) or DEGRADED with a reason."""
    if report.status == search_pb2.STAGE_STATUS_DEGRADED:
        text = report.reason
        return any(w in text for w in ("latency budget", "answered within", "no time left"))
    if report.candidates_cut_from:
        return bool(report.plan) and report.candidates_in < report.candidates_cut_from
    return True


def _tail(took_ms: list[float], answers: list[search_pb2.SearchResponse]) -> dict[str, Any]:
    """Where a budgeted search's time goes, for all searches and for the slowest 10 % (the p95's
    neighbourhood): medians of the client's latency, the server's took_ms, each stage's took_ms, the
    server's time outside the stages (planning, reading texts, evidence, the reply) and the client's
    outside the server (transport, the gRPC stack on both sides)."""
    rows = []
    for client_ms, answer in zip(took_ms, answers, strict=True):
        stages = {
            common_pb2.Stage.Name(r.stage).removeprefix("STAGE_").lower(): r.took_ms for r in answer.stages
        }
        row = {"client_ms": client_ms, "server_ms": answer.took_ms}
        row |= {
            f"{name}_ms": ms
            for name, ms in stages.items()
            if name in ("retrieve", "late_interaction", "cross_encoder")
        }
        row["server_outside_stages_ms"] = answer.took_ms - sum(r.took_ms for r in answer.stages)
        row["client_outside_server_ms"] = client_ms - answer.took_ms
        rows.append(row)
    slowest = sorted(rows, key=lambda r: -r["client_ms"])[: max(1, len(rows) // 10)]

    def medians(group: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(float(np.median([r.get(k, 0.0) for r in group])), 2) for k in rows[0]}

    out = {"all": medians(rows), "slowest_10_percent": medians(slowest)}
    log("where the time goes (medians, ms): " + "; ".join(f"{k}: {v}" for k, v in out.items()))
    return out


def budget_section(
    stub: search_pb2_grpc.SearchServiceStub, warmup: list[str], queries: list[str], budget_ms: int
) -> dict[str, Any]:
    settings = common_pb2.SearchSettings()
    settings.CopyFrom(CASCADE)
    settings.latency_budget_ms = budget_ms

    def run(batch: list[str]) -> tuple[list[float], list[search_pb2.SearchResponse]]:
        took, answers = [], []
        for query in batch:
            started = time.perf_counter()
            answers.append(stub.Search(_request(query, settings), timeout=30))
            took.append((time.perf_counter() - started) * 1000)
        return took, answers

    warm_ms, _ = run(warmup)
    took_ms, answers = run(queries)
    outcomes: dict[str, int] = {}
    reasons: dict[str, int] = {}
    unexplained = 0
    ce_in: list[int] = []
    for answer in answers:
        for report in answer.stages[1:]:
            stage = common_pb2.Stage.Name(report.stage).removeprefix("STAGE_").lower()
            status = search_pb2.StageStatus.Name(report.status).removeprefix("STAGE_STATUS_").lower()
            kind = f"{stage}:{status}" + (":cut" if report.candidates_cut_from else "")
            outcomes[kind] = outcomes.get(kind, 0) + 1
            unexplained += not _says_why(report)
            if report.reason:
                why = f"{stage}: {report.reason.split(':')[0][:60]}"
                reasons[why] = reasons.get(why, 0) + 1
            if (
                report.stage == common_pb2.STAGE_CROSS_ENCODER
                and report.status == search_pb2.STAGE_STATUS_COMPLETED
            ):
                ce_in.append(report.candidates_in)
    p95 = float(np.percentile(took_ms, 95))
    example = next((a for a in answers if a.stages[-1].plan), answers[-1])
    tail = _tail(took_ms, answers)
    result = {
        "budget_ms": budget_ms,
        "warmup_queries": len(warmup),
        "warmup": percentiles(warm_ms) | {"p95_ms": float(np.percentile(warm_ms, 95))},
        "queries": len(queries),
        "latency": percentiles(took_ms) | {"p95_ms": p95},
        "stage_outcomes": outcomes,
        "reasons": reasons,
        "cross_encoder_candidates_when_completed": percentiles([float(x) for x in ce_in]) if ce_in else {},
        "stages_touched_without_saying_so": unexplained,
        "where_the_time_goes": tail,
        "example_plan": {common_pb2.Stage.Name(r.stage): (r.plan, r.reason) for r in example.stages},
    }
    result["target_p95"] = _verdict(
        f"budget {budget_ms} ms: p95 <= {budget_ms + BUDGET_P95_SLACK_MS:.0f} ms",
        p95 <= budget_ms + BUDGET_P95_SLACK_MS,
        f"p95 {p95:.2f} ms (p50 {result['latency']['p50_ms']:.2f} ms)",
    )
    result["target_says_so"] = _verdict(
        "every cut or skipped stage says so", unexplained == 0, f"{unexplained} reports without a reason"
    )
    return result


def service_section(
    beir: Path,
    limit_docs: int | None,
    limit_queries: int | None,
    budget_ms: int,
    warmup: int,
    client: str,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    data = load_beir(beir)
    corpus = data.corpus
    if limit_docs:
        relevant = {d for q in data.qrels.values() for d in q}
        keep = sorted(relevant & set(corpus))[:limit_docs]
        keep += random.Random(0).sample(sorted(set(corpus) - set(keep)), max(0, limit_docs - len(keep)))
        corpus = {k: corpus[k] for k in keep}
    queries = [data.queries[q] for q in sorted(data.queries)][: limit_queries or None]
    train = load_beir(beir, "train")
    train_queries = [train.queries[q] for q in sorted(train.queries)]
    warm = train_queries[:warmup]
    # Distinct from the stream section's: its queries' encodings are cached in Redis by now.
    budgeted = train_queries[warmup : warmup + len(queries)]
    with tempfile.TemporaryDirectory(prefix="sieve-explain-") as tmp:
        work = Path(tmp)
        if data_dir is not None:
            # A fresh Redis: the last run's cached query encodings would make retrieval look free.
            shutil.rmtree(data_dir / "redis", ignore_errors=True)
        running = sieve_run(data_dir or work / "data", models_folder(work), work / "run.log")
        with running as address, grpc.insecure_channel(address) as channel:
            log(f"indexing {len(corpus)} documents")
            index_s = index(channel, corpus)
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for query in warm[:5]:  # the first searches load what they need (the worker its model)
                stub.Search(_request(query, LATE), timeout=60)
                stub.Search(_request(query, CASCADE), timeout=60)
            log(f"stream: {len(queries)} queries")
            stream = stream_section(address, queries, client)
            log(f"budget {budget_ms} ms: {len(warm)} warm-up + {len(budgeted)} queries")
            budget = budget_section(stub, warm, budgeted, budget_ms)
    return {
        "documents": len(corpus),
        "index_s": index_s,
        "loadavg": list(os.getloadavg()),
        "stream": stream,
        "budget": budget,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("section", choices=("bytes", "service"))
    parser.add_argument("--beir", type=Path, default=DEFAULT_BEIR)
    parser.add_argument("--limit-docs", type=int)
    parser.add_argument("--limit-queries", type=int)
    parser.add_argument("--budget-ms", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=40, help="train queries run first (budget section)")
    parser.add_argument(
        "--client", choices=("aio", "sync"), default="aio", help="gRPC client for the stream timings"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="service: keep the server's data here and reuse an indexed collection on the next run (its Redis "
        "starts empty each time; default: a temporary folder, indexed afresh)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    quick = bool(args.limit_docs or args.limit_queries)
    if args.section == "bytes":
        payload = bytes_section(args.beir, args.limit_docs)
    else:
        payload = service_section(
            args.beir,
            args.limit_docs,
            args.limit_queries,
            args.budget_ms,
            args.warmup,
            args.client,
            args.data_dir,
        )
    payload["loadavg_end"] = list(os.getloadavg())
    write_result(
        f"explain-{args.section}",
        payload,
        command=command_line("bench/explain.py", argv),
        quick=quick,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
