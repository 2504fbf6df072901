"""`sieve eval`: index a BEIR folder through UpsertDocuments and score it through Search, over gRPC.

The corpus is indexed once; each cascade configuration asked for (`--cascade retrieve`, `--cascade
late`, `--cascade late+cross`, `--cascade lexical`, `--cascade hybrid`, `--cascade hybrid+late`...) then
runs every query and is reported on its own, so the configurations are compared on the same index in the
same run; they take turns query by query, so that their latencies are comparable too.

`sieve eval --json` prints exactly one JSON document on stdout: the data set, the first configuration's
metrics at the top level (`ndcg@10`, `recall@100`, `mrr@10`, `cascade`, `search_queries_per_s`) and every
configuration in `runs`. A self-started server or stack writes its logs to stderr only.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
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
from sieve_core.beir import evaluate, load_beir


@dataclass
class EvalOptions:
    folder: Path
    address: str | None = None
    split: str = "test"
    top_k: int = 100
    batch_size: int = 64
    keep: bool = False
    quiet: bool = False
    # Cascade configurations, each an optional first stage ("retrieve" or "dense" by default, "lexical",
    # "hybrid") and '+'-joined re-ranking stages: "retrieve", "late", "cross", "late+cross", "lexical",
    # "hybrid", "hybrid+late"... Every stage is REQUIRED: one that cannot run fails eval.
    cascades: tuple[str, ...] = ("retrieve",)
    candidates: int = 100  # retrieved for re-ranking
    late_keep: int = 100  # kept by late interaction (what the cross-encoder sees)
    cross_keep: int = 100  # kept by the cross-encoder
    token_pool_factor: int = 0  # late interaction's token pooling (1: none); 0: the server's default format
    token_codec: str = ""  # late interaction's token codec (int4, int8, fp16); "": the server's default

    def needs_workers(self) -> bool:
        """Workers (and Redis) are needed for the cross-encoder, and for late interaction only with a
        separate ColBERT bundle (SIEVE_LATE_INTERACTION_MODEL): zero-shot late interaction runs in the server
        from the token vectors stored with the documents."""
        stages = {stage for c in self.cascades for stage in parse_cascade(c)}
        colbert = bool(os.environ.get("SIEVE_LATE_INTERACTION_MODEL"))
        return "cross" in stages or ("late" in stages and colbert)


STAGE_NAMES = {"late": "late_interaction", "cross": "cross_encoder"}
# The first stage a spec may start with (default "retrieve", dense): which retrievers run.
FIRST_STAGES = {
    "retrieve": common_pb2.RETRIEVAL_DENSE,
    "dense": common_pb2.RETRIEVAL_DENSE,
    "lexical": common_pb2.RETRIEVAL_LEXICAL,
    "hybrid": common_pb2.RETRIEVAL_HYBRID,
}
RRF_K = 60  # hybrid specs fuse by reciprocal rank fusion with the server's default k


def _split(spec: str) -> tuple[str, list[str]]:
    parts = [s.strip() for s in spec.split("+")]
    first = parts[0] if parts and parts[0] in FIRST_STAGES else "retrieve"
    return first, [p for p in (parts[1:] if parts and parts[0] in FIRST_STAGES else parts) if p != "retrieve"]


def parse_cascade(spec: str) -> tuple[str, ...]:
    """The re-ranking stages of a spec: 'late+cross' -> ('late', 'cross'); 'retrieve', 'lexical', 'hybrid'
    -> (); 'hybrid+late' -> ('late',). Raises ValueError for anything else."""
    _, stages = _split(spec)
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if (
        not spec.strip()
        or unknown
        or len(set(stages)) != len(stages)
        or stages != sorted(stages, key=list(STAGE_NAMES).index)
    ):
        raise ValueError(
            f"bad cascade {spec!r}: an optional first stage ('retrieve' or 'dense', 'lexical', 'hybrid') "
            "then re-ranking stages in order ('late', 'cross'), joined by '+': e.g. 'hybrid+late+cross'"
        )
    return tuple(stages)


def first_stage(spec: str) -> str:
    """'hybrid+late' -> 'hybrid'; 'late' -> 'retrieve' (dense)."""
    parse_cascade(spec)  # validates
    return _split(spec)[0]


def describe_cascade(spec: str, opts: EvalOptions) -> str:
    stages = parse_cascade(spec)
    first = {
        "retrieve": "retrieve",
        "dense": "retrieve",
        "lexical": "lexical",
        "hybrid": f"hybrid (rrf k={RRF_K})",
    }
    parts = [f"{first[first_stage(spec)]} {opts.candidates if stages else opts.top_k}"]
    if "late" in stages:
        parts.append(f"late_interaction {max(opts.late_keep, opts.top_k)}")
    if "cross" in stages:
        parts.append(f"cross_encoder {max(opts.cross_keep, opts.top_k)}")
    return " > ".join(parts)


def cascade_settings(spec: str, opts: EvalOptions) -> common_pb2.SearchSettings:
    stages = parse_cascade(spec)
    required, off = common_pb2.STAGE_MODE_REQUIRED, common_pb2.STAGE_MODE_OFF
    retrieval = FIRST_STAGES[first_stage(spec)]
    return common_pb2.SearchSettings(
        retrieval=retrieval,
        fusion=common_pb2.FUSION_RRF if retrieval == common_pb2.RETRIEVAL_HYBRID else None,
        rrf_k=RRF_K if retrieval == common_pb2.RETRIEVAL_HYBRID else None,
        retrieve_candidates=max(opts.candidates, opts.top_k),
        late_interaction=required if "late" in stages else off,
        late_interaction_keep=opts.late_keep,
        cross_encoder=required if "cross" in stages else off,
        cross_encoder_keep=opts.cross_keep,
    )


@contextlib.contextmanager
def self_started_server(env: dict[str, str] | None = None, *, workers: bool = False) -> Iterator[str]:
    """A throwaway service on free loopback ports with a temporary data directory: `sieve serve`, or
    with `workers` the whole `sieve run` (its own Redis, an `embed`+`colbert` worker, and a `cross_encoder`
    one when SIEVE_CROSS_ENCODER_MODEL is set). Its output goes to stderr: stdout is for the result."""
    settings = dict(env or {})
    command = "serve"
    if workers:
        command = "run"
        # embed: a ColBERT bundle's document token vectors; colbert: its query encoding.
        settings.update(SIEVE_LOCAL_REDIS_PORT=str(free_port()), SIEVE_RUN_WORKER_QUEUES="embed,colbert")
        # A cross-encoder's pairs take seconds per search on this kind of machine; give the stage time.
        settings.setdefault("SIEVE_RERANK_TIMEOUT_S", "60")
    # The caller's SIEVE_* settings apply (models directory, cross-encoder...); a self-started `sieve run`
    # brings its own Redis, so an outer SIEVE_REDIS_URL must not leak into it.
    with (
        tempfile.TemporaryDirectory(prefix="sieve-eval-") as data_dir,
        stack.sieve_process(
            command,
            data_dir=Path(data_dir),
            settings=settings,
            inherit_env=True,
            unset=("SIEVE_REDIS_URL",) if workers else (),
            timeout_s=120,
        ) as served,
    ):
        yield served.address


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=quiet,
        transient=False,
    )


def run_eval(opts: EvalOptions) -> dict[str, object]:
    data = load_beir(opts.folder, opts.split)
    if opts.address:
        return _eval_on(opts.address, data, opts)
    with self_started_server(workers=opts.needs_workers()) as address:
        return _eval_on(address, data, opts)


def _eval_on(address: str, data, opts: EvalOptions) -> dict[str, object]:
    name = f"eval-{data.name}-{uuid.uuid4().hex[:8]}"
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        collections = collections_pb2_grpc.CollectionServiceStub(channel)
        documents = documents_pb2_grpc.DocumentServiceStub(channel)
        search = search_pb2_grpc.SearchServiceStub(channel)
        # A cascade with late interaction: make it the collection's default, so that the collection stores
        # its documents' token vectors (default format) with each upsert, as a user's collection would.
        late = any("late" in parse_cascade(spec) for spec in opts.cascades)
        defaults = (
            common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT) if late else None
        )
        collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(
                    name=name,
                    defaults=defaults,
                    token_storage=collections_pb2.TokenStorage(
                        pool_factor=opts.token_pool_factor, codec=opts.token_codec
                    )
                    if late and (opts.token_pool_factor or opts.token_codec)
                    else None,
                )
            ),
            timeout=60,
        )
        try:
            ids = list(data.corpus)
            started = time.perf_counter()
            with _progress(opts.quiet) as bar:
                task = bar.add_task("indexing", total=len(ids), rate="")
                for i in range(0, len(ids), opts.batch_size):
                    batch = [
                        documents_pb2.Document(id=d, text=data.corpus[d])
                        for d in ids[i : i + opts.batch_size]
                    ]
                    documents.UpsertDocuments(
                        documents_pb2.UpsertDocumentsRequest(collection=name, documents=batch), timeout=600
                    )
                    done = i + len(batch)
                    bar.update(
                        task, completed=done, rate=f"{done / (time.perf_counter() - started):.1f} docs/s"
                    )
            index_s = time.perf_counter() - started
            runs = _search_all(search, name, data, list(opts.cascades), opts)
        finally:
            if not opts.keep:
                collections.DeleteCollection(collections_pb2.DeleteCollectionRequest(name=name), timeout=60)
    first = {k: v for k, v in runs[0].items() if k not in ("spec", "stage_ms_p50")}
    return {
        "dataset": data.name,
        "split": opts.split,
        "documents": len(data.corpus),
        "queries": len(data.queries),
        "index_docs_per_s": len(data.corpus) / index_s,
        "collection": name if opts.keep else None,
        # The first configuration's metrics at the top level too (`ndcg@10`, ...): the flat keys of the
        # original contract, which scripts read; `runs` has every configuration.
        **first,
        "runs": runs,
    }


def _search_all(search, name: str, data, specs: list[str], opts: EvalOptions) -> list[dict[str, object]]:
    """Every query through every cascade configuration; their metrics and speed.

    The configurations take turns query by query (the first of each query rotating), so that a change in
    the machine's load falls on all alike. With a query-vector cache (a stack with Redis) a later call on
    the same query skips its embedding, so compare latencies from a run without one (`sieve serve`)."""
    settings = [cascade_settings(spec, opts) for spec in specs]
    runs: list[dict[str, list[str]]] = [{} for _ in specs]
    stage_ms: list[dict[str, list[float]]] = [{} for _ in specs]
    call_ms: list[list[float]] = [[] for _ in specs]
    started = time.perf_counter()
    with _progress(opts.quiet) as bar:
        task = bar.add_task(f"searching ({', '.join(specs)})", total=len(data.queries), rate="")
        for n, (qid, text) in enumerate(data.queries.items(), 1):
            for i in [(n + j) % len(specs) for j in range(len(specs))]:
                request = search_pb2.SearchRequest(
                    collection=name, query=text, top_k=opts.top_k, omit_documents=True, settings=settings[i]
                )
                t = time.perf_counter()
                response = search.Search(request, timeout=120)
                call_ms[i].append((time.perf_counter() - t) * 1000)
                runs[i][qid] = [hit.id for hit in response.hits]
                for report in response.stages:
                    if report.status == search_pb2.STAGE_STATUS_COMPLETED:
                        key = common_pb2.Stage.Name(report.stage).removeprefix("STAGE_").lower()
                        stage_ms[i].setdefault(key, []).append(report.took_ms)
            bar.update(task, completed=n, rate=f"{n / (time.perf_counter() - started):.1f} q/s")
    return [
        {
            "cascade": describe_cascade(spec, opts),
            "spec": spec,
            **evaluate(runs[i], data.qrels),
            "search_queries_per_s": 1000 * len(call_ms[i]) / max(sum(call_ms[i]), 1e-9),
            "search_ms": {
                "p50": statistics.median(call_ms[i]),
                "p99": statistics.quantiles(call_ms[i], n=100)[98] if len(call_ms[i]) > 1 else call_ms[i][0],
            },
            "stage_ms_p50": {k: statistics.median(v) for k, v in stage_ms[i].items()},
        }
        for i, spec in enumerate(specs)
    ]
