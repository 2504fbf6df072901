"""Load and backpressure: mixed Search and UpsertDocuments from C concurrent clients for D seconds against a
real `sieve serve`, every outcome counted by status, the server's memory sampled every second.

    .venv/bin/python bench/load.py [--beir ../shared/datasets/scifact] [--clients 32] [--duration 60]
                                   [--low-limit 8] [--max-calls 200000] [--name load]
                                   [--servers 1,3 [--rounds 2]]

Per configuration: a `sieve serve` subprocess on a free loopback port (127.0.0.1 only), no Redis and no
workers (so every Search is the retrieval stage: the query embedded by ONNX, usearch, top 10 with documents;
the metrics endpoint is off). The servers take turns on one temporary data directory, which the first seeds
with the first --documents documents of a BEIR corpus (synthetic texts when the folder is absent); each
server first writes the hot documents (below) again in seeding-size batches, longest first, so that
onnxruntime's memory arena has its working size before anything is measured (see `prime`). Then C
clients, each with its own grpc.aio channel and its own TCP connection, call in a closed loop for --warmup
seconds and then --duration seconds (or until --max-calls calls have started, whichever comes first): a
Search for a random test query with probability --search-share, otherwise an UpsertDocuments of
--upsert-batch documents drawn from a fixed set of --hot-ids seeded ids, each id's text flipping between
two versions at every write (the server skips unchanged texts; these are embedded again). The corpus, and the memory it legitimately needs, stays the same size however long
the run. Every call has a deadline (--search-deadline, --upsert-deadline).

Outcomes: every call is counted by kind and status, warm-up included. RESOURCE_EXHAUSTED is the server's
deliberate refusal past SIEVE_MAX_INFLIGHT_REQUESTS; it counts as deliberate only when it carries a
google.rpc.RetryInfo (decoded from the grpc-status-details-bin trailer by the Python client's own decoder),
and the refused client then waits the delay it names. Every other non-OK outcome is an error. Latency
(p50/p95/p99) and throughput per kind are over the OK calls started in the measured window. The server's
RSS comes from /proc/<pid>/status every second; flatness is the median RSS of the measured window's first
10 s against its last 10 s, and the slope of a least-squares line through all its samples (MB/min).

Configurations: the server's default limit (SIEVE_MAX_INFLIGHT_REQUESTS unset, 64: above the 32 clients'
32 calls at a time, so no refusal is expected), then, unless --low-limit 0, the same load against a limit
of --low-limit (default 8), where refusals must appear and nothing else may fail. Results go to
bench/results/<name>.json with the machine and library versions.

Several servers (--servers 1,3): every configuration runs on PostgreSQL instead (a cluster this script starts
from the machine's packages, sieve_cli/pg_cluster.py; one database for the whole run, seeded once). A
configuration of N servers starts N `sieve serve` over that database, each on its own data directory (they
rebuild their indexes from the database at start and follow each other's writes, README: "Several servers
over one PostgreSQL database"), and client k calls server k mod N (each client keeps its own connection to
one server). The server counts take turns, --rounds times over (1, 3, 1, 3, ... with --rounds 2), on the
same corpus and the same database; the low-limit run, if any, is last, on the largest count (the limit is
per server). Throughput is the sum over the servers; memory figures are the first server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table
from run import ROOT, command_line, log, percentiles, write_result
from sieve.errors import retry_delay_of, status_details
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
from sieve_cli.pg_cluster import PostgresCluster
from sieve_core.config import load_settings

DEFAULT_BEIR = ROOT.parent / "shared" / "datasets" / "scifact"
COLLECTION = "load"
SEED_BATCH = 32
FLAT_WINDOW_S = 10.0  # the first and last stretch of the measured window whose median RSS is compared
DELIBERATE = "RESOURCE_EXHAUSTED"
NO_RETRY_INFO = "RESOURCE_EXHAUSTED_WITHOUT_RETRY_INFO"  # a refusal that does not say when to retry: an error
RETRIEVE_ONLY = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_OFF, cross_encoder=common_pb2.STAGE_MODE_OFF
)


@dataclass(frozen=True)
class LoadConfig:
    """One load run. `max_inflight` None leaves the server's default limit (SIEVE_MAX_INFLIGHT_REQUESTS unset)."""

    label: str = "default limit"
    clients: int = 32
    duration_s: float = 60.0
    warmup_s: float = 20.0
    search_share: float = 0.8
    upsert_batch: int = 4
    hot_ids: int = 64
    max_calls: int = 200_000
    search_deadline_s: float = 30.0
    upsert_deadline_s: float = 60.0
    max_inflight: int | None = None
    retry_after_ms: int | None = None  # SIEVE_OVERLOAD_RETRY_AFTER_MS; None: the server's default
    server_settings: dict[str, str] = field(default_factory=dict)  # other SIEVE_* variables for the server
    seed: int = 7
    servers: int = 1  # `sieve serve` processes over one PostgreSQL database (run_load's store_url)
    postgres: bool = False  # on run_load's store_url rather than the data directory's SQLite file

    def env(self) -> dict[str, str]:
        env = dict(self.server_settings)
        if self.max_inflight is not None:
            env["SIEVE_MAX_INFLIGHT_REQUESTS"] = str(self.max_inflight)
        if self.retry_after_ms is not None:
            env["SIEVE_OVERLOAD_RETRY_AFTER_MS"] = str(self.retry_after_ms)
        return env


@dataclass
class Corpus:
    name: str
    ids: list[str]
    texts: list[str]
    queries: list[str]


# A fixed vocabulary for synthetic documents: sentences of a few dozen words, about the length of a short
# abstract's first lines, so embedding them costs what real text of that length costs.
_SUBJECTS = ["protein", "enzyme", "neuron", "vaccine", "tumour", "bacteria", "membrane", "receptor"]
_VERBS = ["regulates", "inhibits", "binds", "activates", "reduces", "predicts", "increases", "alters"]
_OBJECTS = ["expression", "signalling", "survival", "inflammation", "growth", "transport", "risk", "repair"]
_CONTEXTS = ["in mice", "in adults", "in vitro", "after surgery", "in children", "under stress"]


def synthetic_corpus(documents: int, queries: int = 200) -> Corpus:
    """Deterministic texts (a fixed vocabulary, indexes as the only source of variety)."""

    def sentence(i: int, k: int) -> str:
        return (
            f"The {_SUBJECTS[(i + k) % 8]} {_VERBS[(i * 3 + k) % 8]} {_OBJECTS[(i * 5 + 2 * k) % 8]} "
            f"{_CONTEXTS[(i + 3 * k) % 6]} (cohort {i % 97}, arm {k})."
        )

    texts = [" ".join(sentence(i, k) for k in range(4)) for i in range(documents)]
    asks = [
        f"does {_SUBJECTS[i % 8]} {_VERBS[(i // 8) % 8].removesuffix('s')} {_OBJECTS[(i // 64) % 8]}"
        for i in range(queries)
    ]
    return Corpus("synthetic", [f"doc-{i}" for i in range(documents)], texts, asks)


def beir_corpus(folder: Path, documents: int) -> Corpus:
    """The first `documents` documents of a BEIR corpus (title + text, as load_beir builds them) and its
    test queries."""
    from sieve_core.beir import load_beir

    data = load_beir(folder)
    ids = list(data.corpus)[:documents]
    return Corpus(data.name, ids, [data.corpus[d] for d in ids], list(data.queries.values()))


# -- the server -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sieve_serve(
    data_dir: Path, log_path: Path, settings: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen]]:  # type: ignore[type-arg]
    """`sieve serve` (sieve_cli.stack) with only the given SIEVE_ settings besides paths and a quiet log."""
    with stack.sieve_process(
        "serve",
        data_dir=data_dir,
        settings={"SIEVE_LOG_LEVEL": "WARNING", **settings},
        log=log_path,
        timeout_s=180,
    ) as served:
        yield served.address, served.proc


def _upsert_batches(channel: grpc.Channel, ids: list[str], texts: list[str]) -> None:
    docs = documents_pb2_grpc.DocumentServiceStub(channel)
    for i in range(0, len(ids), SEED_BATCH):
        batch = [
            documents_pb2.Document(id=d, text=t)
            for d, t in zip(ids[i : i + SEED_BATCH], texts[i : i + SEED_BATCH], strict=True)
        ]
        docs.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=batch), timeout=600
        )


def seed(address: str, corpus: Corpus) -> float:
    """Creates the collection and upserts the corpus in batches; returns the seconds it took."""
    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        collections_pb2_grpc.CollectionServiceStub(channel).CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=COLLECTION)),
            timeout=60,
        )
        _upsert_batches(channel, corpus.ids, corpus.texts)
    return time.perf_counter() - started


def prime(address: str, corpus: Corpus, hot_ids: int) -> float:
    """Writes the hot documents again, longest first, in seeding-size batches: onnxruntime's memory arena
    keeps the largest (batch x length) it has served, so a server that has not seeded (a restart) would
    otherwise grow it in steps during the measured window the first time long upserts meet. On the server
    that seeded, the texts are unchanged and the server skips them (its seeding batches sized the arena
    already); on a restarted one they differ from the load's revisions and are embedded. Returns seconds."""
    started = time.perf_counter()
    hot = sorted(range(min(hot_ids, len(corpus.ids))), key=lambda i: -len(corpus.texts[i]))
    with grpc.insecure_channel(address) as channel:
        _upsert_batches(channel, [corpus.ids[i] for i in hot], [corpus.texts[i] for i in hot])
    return time.perf_counter() - started


def proc_status_mb(pid: int, field_name: str = "VmRSS") -> float | None:
    """A memory figure of /proc/<pid>/status in MB (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    except (OSError, ValueError):
        return None
    return None


# RSS split in the kernel's own parts: anonymous memory (heaps, arenas: where a leak shows) and file-backed
# pages (mapped files such as tantivy's segments: a cache the kernel can drop, which moves with merges).
RSS_PARTS = ("RssAnon", "RssFile")


class RssSampler(threading.Thread):
    """Reads a process's RSS every `interval` seconds (a thread, so a busy event loop cannot delay it much),
    and its anonymous and file-backed parts beside it (`parts`)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []  # (time.monotonic(), MB)
        self.parts: dict[str, list[tuple[float, float]]] = {name: [] for name in RSS_PARTS}
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            mb = proc_status_mb(self.pid)
            if mb is None:
                return
            now = time.monotonic()
            self.samples.append((now, mb))
            for name, series in self.parts.items():
                part = proc_status_mb(self.pid, name)
                if part is not None:
                    series.append((now, part))
            if self._halt.wait(self.interval):
                return

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        return self.samples


def flatness(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    """RSS over [start, end]: medians of the first and last FLAT_WINDOW_S, growth between them, the slope
    of a least-squares line (MB/min), the same over the second half alone, and the samples themselves
    (seconds from `start`, MB).

    The second-half figures help tell a step from a creep. Allocators keep their high-water footprint:
    onnxruntime's CPU arena grows when concurrent runs of long batches first need more (in-process, 4 threads
    embedding SciFact batches of 4 took 443 -> 485 MB and then stayed there for 300 more batches), so the
    server's RSS moves in rare steps and is flat between them. On SciFact, 60 s windows here moved by about
    +1 MB; 300 s windows by +4 to +20 MB, in one or two steps of 8 to 18 MB each. A creep shows as a steady
    slope in every stretch instead; the series is kept so that either can be seen."""
    window = [(t - start, mb) for t, mb in samples if start <= t <= end]
    span = end - start
    out: dict[str, Any] = {"samples": len(window)}
    for prefix, lo in (("", 0.0), ("second_half_", span / 2)):
        part = [(t, mb) for t, mb in window if t >= lo]
        first = [mb for t, mb in part if t < lo + FLAT_WINDOW_S]
        last = [mb for t, mb in part if t >= span - FLAT_WINDOW_S]
        if first and last:
            a, b = round(statistics.median(first), 1), round(statistics.median(last), 1)
            if not prefix:
                out.update(rss_first_mb=a, rss_last_mb=b)
            out[f"{prefix}growth_mb"] = round(b - a, 1)
        if len(part) >= 3:
            t, mb = np.array([w[0] for w in part]), np.array([w[1] for w in part])
            out[f"{prefix}slope_mb_per_min"] = round(float(np.polyfit(t, mb, 1)[0]) * 60, 2)
            if not prefix:
                out["min_mb"], out["max_mb"] = round(float(mb.min()), 1), round(float(mb.max()), 1)
    out["series"] = [[round(t, 1), round(mb, 1)] for t, mb in window]
    return out


# -- the clients ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of one run: status counts per kind (whole run), OK latencies per kind (measured window)."""

    statuses: dict[str, Counter[str]] = field(
        default_factory=lambda: {"search": Counter(), "upsert": Counter()}
    )
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {"search": [], "upsert": []})
    retry_delays_ms: Counter[int] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    started: int = 0
    ok_by_server: Counter[tuple[int, str]] = field(
        default_factory=Counter
    )  # OK calls (whole run) by server, kind
    max_generation: int = 0  # the highest generation an UpsertDocuments returned


async def drive(addresses: list[str], corpus: Corpus, cfg: LoadConfig) -> tuple[Tally, float, float]:
    """Runs the clients, client k on addresses[k % len(addresses)]; returns the tally and the measured
    window's (start, end) on time.monotonic()."""
    tally = Tally()
    hot = list(range(min(cfg.hot_ids, len(corpus.ids))))
    # Each write of an id flips its text (shared by the clients, so that nearly every document written
    # differs from the stored one: the server skips embedding unchanged texts).
    revision = dict.fromkeys(hot, 0)
    # Its own subchannel pool per channel: otherwise grpc shares one TCP connection among equal channels.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [
        grpc.aio.insecure_channel(addresses[k % len(addresses)], options=options) for k in range(cfg.clients)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 60)
        begin = time.monotonic()
        measure_from = begin + cfg.warmup_s
        stop_at = measure_from + cfg.duration_s

        async def client(k: int, channel: grpc.aio.Channel) -> None:
            rng = random.Random(cfg.seed * 1_000_003 + k)
            search = search_pb2_grpc.SearchServiceStub(channel)
            documents = documents_pb2_grpc.DocumentServiceStub(channel)
            while (now := time.monotonic()) < stop_at and tally.started < cfg.max_calls:
                tally.started += 1
                kind = "search" if rng.random() < cfg.search_share else "upsert"
                t = time.perf_counter()
                try:
                    if kind == "search":
                        await search.Search(
                            search_pb2.SearchRequest(
                                collection=COLLECTION,
                                query=rng.choice(corpus.queries),
                                top_k=10,
                                settings=RETRIEVE_ONLY,
                            ),
                            timeout=cfg.search_deadline_s,
                        )
                    else:
                        picked = rng.sample(hot, min(cfg.upsert_batch, len(hot)))
                        for i in picked:  # two texts per id: the content changes, its size does not
                            revision[i] ^= 1
                        batch = [
                            documents_pb2.Document(
                                id=corpus.ids[i], text=f"{corpus.texts[i]} (revision {revision[i]})"
                            )
                            for i in picked
                        ]
                        written = await documents.UpsertDocuments(
                            documents_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=batch),
                            timeout=cfg.upsert_deadline_s,
                        )
                        tally.max_generation = max(tally.max_generation, written.generation)
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                    delay = None
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        delay = retry_delay_of(status_details(exc.trailing_metadata()))
                        if delay is None:
                            status = NO_RETRY_INFO
                        else:
                            tally.retry_delays_ms[round(delay * 1000)] += 1
                    tally.statuses[kind][status] += 1
                    tally.error_examples.setdefault(status, f"{kind}: {exc.details()}")
                    # Refused: wait what the server asked (never past the run's end). Failed otherwise:
                    # a short pause, so a dead server is not hammered in a tight loop.
                    pause = delay if delay is not None else 0.1
                    await asyncio.sleep(max(0.0, min(pause, stop_at - time.monotonic())))
                    continue
                elapsed_ms = (time.perf_counter() - t) * 1000
                tally.statuses[kind]["OK"] += 1
                tally.ok_by_server[k % len(addresses), kind] += 1
                if now >= measure_from:
                    tally.latencies_ms[kind].append(elapsed_ms)

        await asyncio.gather(*(client(k, c) for k, c in enumerate(channels)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return tally, measure_from, stop_at


# -- one configuration, end to end --------------------------------------------------------------------------


def run_load(corpus: Corpus, configs: list[LoadConfig], store_url: str | None = None) -> list[dict[str, Any]]:
    """Every configuration in turn, each on its own `sieve serve` processes: on one SQLite data directory,
    or (`postgres` configurations) on the PostgreSQL database `store_url`; each store is seeded by the first
    server that uses it, so the corpus is embedded once per store. The results as dicts."""
    for cfg in configs:
        if cfg.servers > 1 and not cfg.postgres:
            raise ValueError(f"{cfg.label}: several servers need the PostgreSQL store (postgres=True)")
        if cfg.postgres and not store_url:
            raise ValueError(f"{cfg.label}: a PostgreSQL configuration needs store_url")
    with tempfile.TemporaryDirectory(prefix="sieve-load-") as tmp:
        seeded: set[bool] = set()
        runs = []
        for k, cfg in enumerate(configs):
            runs.append(
                run_config(
                    Path(tmp), k, corpus, cfg, seed_first=cfg.postgres not in seeded, store_url=store_url
                )
            )
            seeded.add(cfg.postgres)
        return runs


def caught_up_s(address: str, generation: int) -> float:
    """Seconds until the server at `address` answers a Search with `min_generation` = `generation` (its
    indexes show every write acknowledged by any server up to it)."""
    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        search_pb2_grpc.SearchServiceStub(channel).Search(
            search_pb2.SearchRequest(
                collection=COLLECTION,
                query="catch up",
                top_k=1,
                min_generation=generation,
                omit_documents=True,
            ),
            timeout=120,
        )
    return round(time.perf_counter() - started, 3)


def run_config(
    tmp: Path, k: int, corpus: Corpus, cfg: LoadConfig, seed_first: bool, store_url: str | None = None
) -> dict[str, Any]:
    """Start the configuration's servers with its settings (on `tmp`/data, or each on its own data directory
    over `store_url`), seed through the first if asked, load them, check every server caught up with the
    last acknowledged write, stop them."""
    env = cfg.env()
    limits = load_settings(env)
    if cfg.postgres:
        env["SIEVE_STORE_URL"] = str(store_url)
        data_dirs = [tmp / f"data-pg-{i}" for i in range(cfg.servers)]
    else:
        data_dirs = [tmp / "data"]
    log_paths = [tmp / f"server-{k}-{i}.log" for i in range(len(data_dirs))]
    seed_s = None
    with contextlib.ExitStack() as servers:
        served = [
            servers.enter_context(sieve_serve(d, log_path, env))
            for d, log_path in zip(data_dirs, log_paths, strict=True)
        ]
        addresses, procs = [a for a, _ in served], [p for _, p in served]
        if seed_first:
            log(f"[{cfg.label}] seeding {len(corpus.ids)} {corpus.name} documents")
            seed_s = round(seed(addresses[0], corpus), 1)
            log(f"[{cfg.label}] seeded in {seed_s:.1f} s")
        # Every server embeds what it is sent: each one's arena is sized before the measured window.
        prime_s = round(sum(prime(a, corpus, cfg.hot_ids) for a in addresses), 1)
        rss_before = proc_status_mb(procs[0].pid)
        log(
            f"[{cfg.label}] {len(addresses)} server(s), first one's RSS {rss_before:.0f} MB; {cfg.clients} "
            f"clients, {cfg.warmup_s:.0f} s warm-up + {cfg.duration_s:.0f} s, limit {limits.max_inflight_requests}"
        )
        sampler = RssSampler(procs[0].pid)
        sampler.start()
        cpu = time.process_time()
        try:
            tally, start, end = asyncio.run(drive(addresses, corpus, cfg))
        finally:
            samples = sampler.stop()
        client_cpu_s = time.process_time() - cpu
        finished = time.monotonic()
        # Every server follows the others' writes: each must show the last generation any server gave.
        catch_up = [caught_up_s(a, tally.max_generation) for a in addresses] if tally.max_generation else []
        peak_mb = proc_status_mb(procs[0].pid, "VmHWM")
        alive = all(p.poll() is None for p in procs)
    server_log = "".join(
        f"--- server {i} ---\n{path.read_text(errors='replace')[-2000:]}" for i, path in enumerate(log_paths)
    )
    return summarise(
        cfg,
        tally,
        start,
        end,
        samples,
        limits={
            "max_inflight_requests": limits.max_inflight_requests,
            "overload_retry_after_ms": limits.overload_retry_after_ms,
        },
        extra={
            "corpus": corpus.name,
            "documents": len(corpus.ids),
            "queries": len(corpus.queries),
            "seed_s": seed_s,
            "prime_s": prime_s,
            "rss_before_load_mb": rss_before,
            "rss_peak_mb": peak_mb,
            "rss_parts": {
                name: {k: v for k, v in flatness(series, start, end).items() if k != "series"}
                for name, series in sampler.parts.items()
            },
            "server_alive_at_end": alive,
            "server_exit_code": next((p.returncode for p in procs if p.returncode != 0), 0),
            "drain_s": round(finished - end, 2),
            "client_cpu_s": round(client_cpu_s, 1),
            "server_log_tail": server_log,
            "servers": {
                "count": len(addresses),
                "store": "postgresql" if cfg.postgres else "sqlite",
                "ok_calls": [
                    {kind: tally.ok_by_server[i, kind] for kind in ("search", "upsert")}
                    for i in range(len(addresses))
                ],
                "last_generation": tally.max_generation,
                "caught_up_s": catch_up,
            },
        },
    )


def summarise(
    cfg: LoadConfig,
    tally: Tally,
    start: float,
    end: float,
    samples: list[tuple[float, float]],
    limits: dict[str, int],
    extra: dict[str, Any],
) -> dict[str, Any]:
    statuses = {kind: dict(sorted(c.items())) for kind, c in tally.statuses.items()}
    total: Counter[str] = Counter()
    for c in tally.statuses.values():
        total.update(c)
    errors = {s: n for s, n in total.items() if s not in ("OK", DELIBERATE)}
    span = end - start
    measured: dict[str, Any] = {"seconds": round(span, 1)}
    for kind, values in tally.latencies_ms.items():
        a = np.asarray(values)
        measured[kind] = {
            "ok": len(values),
            "per_s": round(len(values) / span, 2),
            **percentiles(values),
            "p95_ms": round(float(np.percentile(a, 95)), 3) if a.size else float("nan"),
        }
    return {
        "label": cfg.label,
        "config": asdict(cfg),
        "limits": limits,
        **{k: extra[k] for k in ("corpus", "documents", "queries", "seed_s", "prime_s")},
        "calls": sum(total.values()),
        "capped": tally.started >= cfg.max_calls,
        "statuses": statuses,
        "refused": total.get(DELIBERATE, 0),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "error_examples": {s: m for s, m in tally.error_examples.items() if s in errors},
        "refusal_example": tally.error_examples.get(DELIBERATE),
        "retry_delays_ms": {str(k): n for k, n in sorted(tally.retry_delays_ms.items())},
        "measured": measured,
        "memory": {
            **flatness(samples, start, end),
            **{k: extra[k] for k in ("rss_before_load_mb", "rss_peak_mb", "rss_parts")},
        },
        **{k: extra[k] for k in ("server_alive_at_end", "server_exit_code", "drain_s", "client_cpu_s")},
        "servers": extra["servers"],
        "server_log_tail": extra["server_log_tail"] if sum(errors.values()) else "",
    }


def print_summary(runs: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console(width=120)
    table = Table(
        title=f"bench/load.py: mixed Search / UpsertDocuments, {runs[0]['config']['clients']} clients"
    )
    columns = ("servers", "limit", "kind", "OK", "refused", "errors", "OK/s", "p50 ms", "p95 ms", "p99 ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "kind" else "right")
    for r in runs:
        for kind in ("search", "upsert"):
            s, m = r["statuses"][kind], r["measured"][kind]
            errors = sum(n for status, n in s.items() if status not in ("OK", DELIBERATE))
            table.add_row(
                f"{r['servers']['count']} ({r['servers']['store']})" if kind == "search" else "",
                str(r["limits"]["max_inflight_requests"]) if kind == "search" else "",
                kind,
                str(s.get("OK", 0)),
                str(s.get(DELIBERATE, 0)),
                str(errors),
                f"{m['per_s']:.1f}",
                f"{m['p50_ms']:.1f}",
                f"{m['p95_ms']:.1f}",
                f"{m['p99_ms']:.1f}",
            )
    console.print(table)
    for n, figures in throughput_by_servers(runs).items():
        console.print(
            f"{n} server(s): OK calls/s (search + upsert) per round {figures['per_round']}, median "
            f"{figures['median']}"
            + (f", {figures['vs_one_server']}x one server's" if "vs_one_server" in figures else "")
        )
    nan = float("nan")
    for r in runs:
        mem = r["memory"]
        console.print(
            f"limit {r['limits']['max_inflight_requests']}: server RSS {mem.get('rss_first_mb', nan):.1f} MB (first "
            f"{FLAT_WINDOW_S:.0f} s) -> {mem.get('rss_last_mb', nan):.1f} MB (last {FLAT_WINDOW_S:.0f} s), growth "
            f"{mem.get('growth_mb', nan):+.1f} MB, slope {mem.get('slope_mb_per_min', nan):+.2f} MB/min (second "
            f"half {mem.get('second_half_growth_mb', nan):+.1f} MB, {mem.get('second_half_slope_mb_per_min', nan):+.2f} "
            f"MB/min), peak "
            f"{mem['rss_peak_mb']:.1f} MB ("
            + ", ".join(f"{k} {v.get('growth_mb', nan):+.1f} MB" for k, v in mem.get("rss_parts", {}).items())
            + f"); errors {r['errors_by_status'] or 0}; RetryInfo delays (ms: count) "
            f"{r['retry_delays_ms'] or '-'}"
        )


def throughput_by_servers(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """OK calls/s (search + upsert, measured window) of the default-limit runs, by server count: per round,
    their median, and the median's ratio to one server's when both ran."""
    by: dict[int, list[float]] = {}
    for r in runs:
        if r["config"]["max_inflight"] is None:
            m = r["measured"]
            by.setdefault(r["servers"]["count"], []).append(
                round(m["search"]["per_s"] + m["upsert"]["per_s"], 2)
            )
    out: dict[int, dict[str, Any]] = {
        n: {"per_round": v, "median": round(statistics.median(v), 2)} for n, v in sorted(by.items())
    }
    if 1 in out:
        for n, figures in out.items():
            if n != 1:
                figures["vs_one_server"] = round(figures["median"] / out[1]["median"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = LoadConfig()
    parser.add_argument(
        "--beir", type=Path, default=DEFAULT_BEIR, help="BEIR folder; synthetic texts if absent"
    )
    parser.add_argument(
        "--documents",
        type=int,
        default=1200,
        help="documents seeded before the load (above SIEVE_FULL_SCAN_MAX: HNSW)",
    )
    parser.add_argument("--clients", type=int, default=d.clients)
    parser.add_argument("--duration", type=float, default=d.duration_s, help="measured seconds")
    parser.add_argument(
        "--warmup", type=float, default=d.warmup_s, help="seconds of load before the measured window"
    )
    parser.add_argument("--search-share", type=float, default=d.search_share)
    parser.add_argument("--upsert-batch", type=int, default=d.upsert_batch)
    parser.add_argument("--hot-ids", type=int, default=d.hot_ids, help="the ids upserts overwrite")
    parser.add_argument("--max-calls", type=int, default=d.max_calls, help="cap on calls per configuration")
    parser.add_argument("--search-deadline", type=float, default=d.search_deadline_s)
    parser.add_argument("--upsert-deadline", type=float, default=d.upsert_deadline_s)
    parser.add_argument(
        "--low-limit",
        type=int,
        default=8,
        help="second run with this SIEVE_MAX_INFLIGHT_REQUESTS (0: skip it)",
    )
    parser.add_argument(
        "--servers",
        default="",
        help="server counts to compare, e.g. 1,3: every run on one PostgreSQL database (default: one server "
        "on SQLite)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="with --servers: times the counts take turns")
    parser.add_argument("--name", default="load", help="bench/results/<name>.json")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.servers.split(",") if n.strip()]
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the server below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    if (args.beir / "corpus.jsonl").is_file():
        corpus = beir_corpus(args.beir, args.documents)
    else:
        log(f"{args.beir} is not a BEIR folder: synthetic texts")
        corpus = synthetic_corpus(args.documents)
    base = LoadConfig(
        clients=args.clients,
        duration_s=args.duration,
        warmup_s=args.warmup,
        search_share=args.search_share,
        upsert_batch=args.upsert_batch,
        hot_ids=args.hot_ids,
        max_calls=args.max_calls,
        search_deadline_s=args.search_deadline,
        upsert_deadline_s=args.upsert_deadline,
    )
    configs = [base]
    if counts:
        configs = [
            replace(base, label=f"{n} server(s), round {r + 1}", servers=n, postgres=True)
            for r in range(args.rounds)
            for n in counts
        ]
    if args.low_limit > 0:
        configs.append(
            replace(
                base,
                label="low limit",
                max_inflight=args.low_limit,
                servers=max(counts or [1]),
                postgres=bool(counts),
            )
        )
    with contextlib.ExitStack() as cluster:
        url = cluster.enter_context(PostgresCluster()).new_database() if counts else None
        runs = run_load(corpus, configs, store_url=url)
    print_summary(runs)
    write_result(
        args.name,
        # Its own kind with --servers: bench/report.py's `load` rows describe the one-server runs.
        {
            "benchmark": "load-servers" if counts else "load",
            "runs": runs,
            "throughput_by_servers": throughput_by_servers(runs),
        },
        command=command_line("bench/load.py", sys.argv[1:] if argv is None else argv),
        quick=args.duration < 60 or args.clients < 32,
        started=started,
    )
    failed = [r["label"] for r in runs if r["errors"] or not r["server_alive_at_end"]]
    if failed:
        log(f"errors other than deliberate RESOURCE_EXHAUSTED in: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
