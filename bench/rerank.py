"""Re-ranking benchmark: late interaction from stored token vectors vs what a pending document costs vs the
cross-encoder, ONNX vs sentence-transformers, and the Celery path's overhead, all measured side by side in
one run on the same candidates.

    .venv/bin/python bench/rerank.py ../shared/datasets/scifact [--queries 30] [--candidates 100]
        [--docs 2000] [--seed 0] [--threads N] [--no-colbert] [--out bench/results/rerank.json]

Inputs. The BEIR folder's test queries; N of them drawn with a fixed seed (random.Random(seed).sample of
the sorted query ids). Candidates: for each query, the bi-encoder top-`candidates` by exact cosine
(all-MiniLM-L6-v2, models/all-MiniLM-L6-v2) over an embedded SUBSET of the corpus: the first `--docs`
documents in corpus order plus every document judged in the split's qrels (so each query's relevant
documents compete with ~2,000 others, as in bench/late_interaction_reference.py --limit-docs). The subset
is embedded once, in one encoder pass that also yields each document's token vectors (stored as the int8
blobs of the default token format, int8 pool 4, as the server stores them); vectors and blobs are kept in bench/.cache (gitignored) for later runs.
Every variant then re-ranks exactly those candidate texts for the same query text.

Models. all-MiniLM-L6-v2 (real weights) for zero-shot late interaction (MaxSim over its own token
vectors). No trained cross-encoder or ColBERT weights are reachable here, so the cross-encoder is the
seeded checkpoint of `python -m sieve_core.models.export_cross_encoder seed` (MiniLM encoder + seeded
one-logit head), exported to an fp32 bundle and its int8 sibling, and the ColBERT model the seeded
colbert-ir checkpoint of `export_colbert seed` (MiniLM + seeded 384->128 projection). They are built
into bench/.cache once (rebuilt only when missing). Their scores carry no ranking quality: they are here
for speed and for agreement between implementations of the same checkpoint, nothing else.

Processes. This process starts its own redis-server on a free port and one real Celery worker
(`celery -A workers.celery_app worker -Q embed,colbert,cross_encoder -c 1`, SIEVE_MODELS_DIR a temporary folder
of symlinks to the bundles, SIEVE_CROSS_ENCODER_MODEL the fp32 cross-encoder), and a subprocess running
sentence-transformers' CrossEncoder (bench/st_cross_encoder_speed.py): torch is never imported here.
All three are stopped at the end, whatever happens.

Variants, per query (a warm-up round on the first query is discarded; then one round per query, the
variants' order rotated each round so that machine noise and cache effects hit all alike; the cheap warm
variants run --repeats times per round, interleaved with each other, the others once):

    li_warm          the server's late-interaction stage in-process (server/core/tokens.py TokenStage._maxsim):
                     MiniLM zero-shot, the query's encoder pass with token rows (the pass that also gives the
                     retrieval vector), the 100 candidates' blobs read by key from a Store's `tokens` table
                     (server/storage/store.py, a temporary SQLite file), prepare_query + maxsim_blobs
    li_pending       what 100 PENDING documents cost instead (there is no "cold" recomputation on the query
                     path any more): sieve_core.late_interaction_service.document_tokens in-process, the
                     function of the sieve.document_tokens task (encode + compress to int8 pool 4)
    ce_fp32          cross_encoder() in-process, fp32 bundle, cache None (pure compute), batch 16
    ce_int8          the same, int8 bundle (one pair per ORT run: dynamic quantization is batch-dependent)
    st_fp32          sentence-transformers CrossEncoder.predict (PyTorch), same checkpoint, same pairs,
                     batch 16, same thread count; timed inside its process (predict() alone)
    li_pending_celery  li_pending through Celery as the server's backfill sends it
                     (server/dispatch/dispatcher.py Dispatcher.document_tokens -> an embed worker: Redis ping,
                     send_task with expires, wait for the result off the event loop). The in-server MaxSim
                     itself has no worker counterpart any more, so the Celery overhead of late interaction
                     is measured on this task
    ce_fp32_celery   ce_fp32 through the Dispatcher, the pair-score keys deleted before each call (the task
                     then reads 100 misses and writes 100 scores back, part of its cost)
    colbert_warm     li_warm with the seeded ColBERT bundle: query_tokens() in-process (what the colbert
                     worker's sieve.query_tokens runs), its blobs (int8 pool 4) read from the Store
    li_warm_blas1    li_warm with numpy's BLAS held to one thread during the call (threadpoolctl): MaxSim's
                     GEMMs on 2 OpenBLAS threads suffer badly when the cores are shared (see
                     sieve_core/late_interaction.py), which is what this machine usually is

Every in-process timing starts from (query, texts): the request with its content hashes is built inside
the timed span, as the Dispatcher builds it inside its. Reported: p50/p90 ms per variant, CE fp32 p50 /
warm LI p50 (the issue's target is >= 20x), pending / warm, the Celery overhead (Celery p50 - in-process p50
of the same stage, and the ratio), pairs/s of ST, ONNX fp32 and int8 (total pairs / total seconds) and
their ratios, and per-query rank agreement with ST (Spearman over the candidates, top-10 overlap).
ONNX sessions use --threads intra-op threads (default: the cores this process may use), the worker
likewise (SIEVE_ONNX_THREADS), torch the same number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import redis
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

try:  # installed with the export extra; the 1-BLAS-thread variant is skipped without it
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None  # type: ignore[assignment]

from server.dispatch.dispatcher import Dispatcher, StageUnavailable
from server.storage.store import SqliteStore, Store
from sieve_core.beir import BeirDataset, load_beir
from sieve_core.cache import pair_score_key
from sieve_core.config import Settings, load_settings
from sieve_core.contracts import (
    Candidate,
    CrossEncoderRequest,
    DocumentTokensRequest,
    QueryTokensRequest,
    TokenFormatSpec,
    content_hash_hex,
)
from sieve_core.cross_encoder_service import cross_encoder
from sieve_core.late_interaction import maxsim_blobs
from sieve_core.late_interaction_service import document_tokens, query_tokens
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.models.colbert import ColbertRunner
from sieve_core.models.cross_encoder import CrossEncoderRunner
from sieve_core.models.export import subprocess_env
from sieve_core.tasking import (
    QUEUE_COLBERT,
    QUEUE_CROSS_ENCODER,
    QUEUE_EMBED,
    TASK_CROSS_ENCODER,
    TASK_DOCUMENT_TOKENS,
    TIME_LIMITS,
    SieveCelery,
)
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress_many, prepare_query
from sieve_core.types import Document
from workers.celery_app import create_app

ROOT = Path(__file__).resolve().parent.parent
MODEL = "all-MiniLM-L6-v2"
CE_NAME = "ce-seeded-minilm"
CE_INT8_NAME = CE_NAME + "-int8"
COLBERT_NAME = "colbert-seeded-minilm"
SEED_LABEL = "seeded:all-MiniLM-L6-v2/0"
ST_SCRIPT = ROOT / "bench" / "st_cross_encoder_speed.py"
CE_BATCH = 16  # the worker's cross_encoder batch (embed_batch_size // 2) and CrossEncoderRunner's default
EMBED_BATCH = 32  # the worker's embed_batch_size default, used for pending documents too
CALL_TIMEOUT_S = 120.0
TOP_AGREEMENT = 10
FMT = DEFAULT_TOKEN_FORMAT  # what a new late-interaction collection stores (int8, pool 4)

VARIANTS: dict[str, str] = {
    "li_warm": "late interaction as the server runs it: query pass, the blobs from the SQLite store, maxsim_blobs",
    "li_pending": "the candidates as pending documents: encode + compress (document_tokens, the embed task), in-process",
    "ce_fp32": "cross-encoder ONNX fp32 (seeded MiniLM), cache None, batch 16, in-process",
    "ce_int8": "cross-encoder ONNX int8 (dynamic quantization), one pair per run, in-process",
    "st_fp32": "sentence-transformers CrossEncoder (PyTorch fp32), same checkpoint and pairs, batch 16, subprocess",
    "li_pending_celery": "li_pending through Celery (server/dispatch/dispatcher.py -> embed worker)",
    "ce_fp32_celery": "ce_fp32 through Celery (Dispatcher -> worker), pair-score keys deleted first",
    "colbert_warm": "li_warm with the seeded ColBERT bundle (128-d): query_tokens() + store + maxsim_blobs",
    "li_warm_blas1": "li_warm with numpy's BLAS limited to 1 thread for the call (threadpoolctl)",
}


# -- small helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def advance(progress: Progress, task: TaskID, step: int = 1) -> None:
    """Advances a bar; when stderr is not a terminal (a log file), also prints a line every 10 %."""
    before = next(t for t in progress.tasks if t.id == task)
    tenth_before = int(10 * before.completed / max(before.total or 1, 1))
    progress.advance(task, step)
    if not progress.console.is_terminal:
        after = next(t for t in progress.tasks if t.id == task)
        tenth = int(10 * after.completed / max(after.total or 1, 1))
        if tenth > tenth_before:
            progress.console.print(
                f"{after.description} {after.completed:.0f}/{after.total:.0f} ({after.elapsed or 0:.0f} s)"
            )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {
        "p50_ms": round(float(np.median(ms)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "min_ms": round(float(ms.min()), 3),
        "samples": len(ms),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's rho defines them)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (starts + (counts - 1) / 2.0)[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


def top_overlap(a: Sequence[float], b: Sequence[float], k: int = TOP_AGREEMENT) -> int:
    top_a = set(np.argsort(-np.asarray(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.asarray(b), kind="stable")[:k].tolist())
    return len(top_a & top_b)


# -- models ----------------------------------------------------------------------------------------------


def _run_step(cmd: list[str], what: str, console: Console) -> None:
    console.print(f"[bold]{what}[/bold]: {shlex.join(cmd)}")
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    console.print(f"  done in {time.perf_counter() - started:.0f} s")


def build_models(cache_dir: Path, colbert: bool, console: Console) -> dict[str, Path]:
    """The seeded checkpoints and their bundles under cache_dir, each built only when missing."""
    py = sys.executable
    checkpoints, bundles = cache_dir / "checkpoints", cache_dir / "models"
    checkpoints.mkdir(parents=True, exist_ok=True)
    bundles.mkdir(parents=True, exist_ok=True)
    ce_ckpt, ce, ce8 = checkpoints / CE_NAME, bundles / CE_NAME, bundles / CE_INT8_NAME
    if not (ce_ckpt / "config.json").is_file():
        seed = [py, "-m", "sieve_core.models.export_cross_encoder", "seed", "--out", str(ce_ckpt)]
        _run_step(seed, "seeded cross-encoder checkpoint", console)
    if not ((ce / "manifest.json").is_file() and (ce8 / "manifest.json").is_file()):
        export = [py, "-m", "sieve_core.models.export", "cross-encoder", "--source", str(ce_ckpt)]
        export += ["--out", str(ce), "--source-label", SEED_LABEL, "--int8"]
        _run_step(export, "cross-encoder export (fp32 + int8)", console)
    paths = {"ce_checkpoint": ce_ckpt, CE_NAME: ce, CE_INT8_NAME: ce8}
    if colbert:
        cb_ckpt, cb = checkpoints / COLBERT_NAME, bundles / COLBERT_NAME
        if not (cb_ckpt / "config.json").is_file():
            seed = [py, "-m", "sieve_core.models.export_colbert", "seed", "--out", str(cb_ckpt)]
            _run_step(seed, "seeded ColBERT checkpoint", console)
        if not (cb / "manifest.json").is_file():
            export = [py, "-m", "sieve_core.models.export", "colbert", "--source", str(cb_ckpt)]
            export += ["--out", str(cb), "--name", COLBERT_NAME, "--source-label", SEED_LABEL]
            _run_step(export, "ColBERT export", console)
        paths[COLBERT_NAME] = cb
    return paths


# -- inputs ----------------------------------------------------------------------------------------------


class BlobStore:
    """Token blobs on disk, one file per key (`blob_key`: model revision, token format and text)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".bin")

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def put(self, key: str, blob: bytes) -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)


def blob_key(runner: Any, text: str) -> str:
    return f"{runner.manifest.cache_id}:{json.dumps(FMT.to_json(), sort_keys=True)}:{content_hash_hex(text)}"


@dataclass
class Case:
    qid: str
    query: str
    doc_ids: list[str]
    texts: list[str]
    relevant_in_candidates: int
    scores: dict[str, list[float]] = field(default_factory=dict)  # variant -> scores of one timed call


def subset_ids(data: BeirDataset, first: int) -> list[str]:
    """The first `first` documents in corpus order, then every judged document not already among them."""
    ids = list(data.corpus)[:first]
    seen = set(ids)
    for rel in data.qrels.values():
        for doc in rel:
            if doc in data.corpus and doc not in seen:
                ids.append(doc)
                seen.add(doc)
    return ids


def embed_subset(
    runner: BiEncoderRunner,
    data: BeirDataset,
    ids: list[str],
    store: BlobStore,
    cache_dir: Path,
    progress: Progress,
) -> np.ndarray:
    """Pooled vectors of the subset (cached as .npy); the same pass stores every document's token blob."""
    digest = hashlib.sha256("\n".join([runner.manifest.cache_id, *ids]).encode()).hexdigest()[:16]
    path = cache_dir / "vectors" / f"{data.name}-{len(ids)}-{digest}.npy"
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape == (len(ids), runner.dims):
            progress.console.print(f"subset vectors from {path.relative_to(ROOT)}")
            return vectors
    path.parent.mkdir(parents=True, exist_ok=True)
    task = progress.add_task("embed subset", total=len(ids))
    parts: list[np.ndarray] = []
    chunk = EMBED_BATCH * 8
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        texts = [data.corpus[d] for d in part]
        vectors, tokens = runner.encode(texts, EMBED_BATCH, tokens=True)
        assert tokens is not None
        for text, blob in zip(texts, compress_many(tokens, FMT), strict=True):
            store.put(blob_key(runner, text), blob)
        parts.append(vectors)
        advance(progress, task, len(part))
    out = np.concatenate(parts)
    np.save(path, out)
    return out


def ensure_blobs(
    runner: Any, texts: Sequence[str], store: BlobStore, progress: Progress, label: str
) -> dict[str, bytes]:
    """Token blobs of these texts under the runner's keys: from disk, the missing ones computed (and saved)."""
    keys = {blob_key(runner, t): t for t in texts}
    found = {k: store.get(k) for k in keys}
    missing = [k for k, blob in found.items() if blob is None]
    if missing:
        task = progress.add_task(label, total=len(missing))
        for start in range(0, len(missing), EMBED_BATCH * 4):
            part = missing[start : start + EMBED_BATCH * 4]
            matrices = runner.document_token_vectors([keys[k] for k in part], EMBED_BATCH)
            for key, blob in zip(part, compress_many(matrices, FMT), strict=True):
                found[key] = blob
                store.put(key, blob)
            advance(progress, task, len(part))
    return {k: v for k, v in found.items() if v is not None}


def load_store(store: Store, name: str, blobs: dict[str, bytes]) -> tuple[int, dict[str, int]]:
    """A collection of the server's store holding these blobs in its `tokens` table, written with their
    documents as UpsertDocuments writes them; returns its id and each blob key's document key."""
    cid = store.create_collection(name, MODEL, MODEL, "cosine", 4, "{}", json.dumps(FMT.to_json()), MODEL).id
    vector = np.zeros(4, dtype=np.float32)
    items = list(blobs.items())
    for start in range(0, len(items), 500):
        chunk = items[start : start + 500]
        docs = [Document(key, "") for key, _ in chunk]
        store.upsert(cid, docs, {d.id: vector for d in docs}, dict(chunk))
    stored = store.documents_by_keys(cid, range(1, len(items) + 1), with_text=False).values()
    keys = {d.doc_id: d.key for d in stored}
    assert len(keys) == len(items), (len(keys), len(items))
    return cid, keys


# -- processes -------------------------------------------------------------------------------------------


def _raise_exit(signum: int, _frame: Any) -> None:
    # SIGTERM (e.g. a benchmark runner's time limit) unwinds like Ctrl-C, so the ExitStack stops the
    # worker, which runs in its own session and would otherwise outlive this process.
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """preexec_fn of the services started here: SIGTERM when this process dies, even by SIGKILL (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
try:  # loaded before any fork: the child only calls it
    _LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _LIBC = None


def start_redis(directory: Path, stack: contextlib.ExitStack) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make redis installs it)")
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )
    stack.callback(_stop, proc, "redis-server")
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit code {proc.poll()})") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[Any], what: str, group: bool = False) -> None:
    """Stops a process this script started (and, with group, its own process group: a worker's pool)."""
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.terminate()
            proc.wait(20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    if proc.poll() is None or group:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)  # pool processes left behind, if any
            else:
                proc.kill()
    proc.wait()


def start_worker(
    redis_url: str,
    app: SieveCelery,
    models_dir: Path,
    threads: int,
    log: Path,
    stack: contextlib.ExitStack,
) -> None:
    """One real `celery worker` process on the embed, colbert and cross_encoder queues, loaded and warm."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(
        SIEVE_REDIS_URL=redis_url,
        SIEVE_MODELS_DIR=str(models_dir),
        SIEVE_DEFAULT_EMBEDDING_MODEL=MODEL,
        SIEVE_CROSS_ENCODER_MODEL=CE_NAME,
        SIEVE_ONNX_THREADS=str(threads),
    )
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"]
    argv += [
        "-Q",
        f"{QUEUE_EMBED},{QUEUE_COLBERT},{QUEUE_CROSS_ENCODER}",
        "-c",
        "1",
        "-P",
        "prefork",
        "--loglevel",
        "INFO",
    ]
    argv += [
        "-n",
        f"bench-rerank-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    stack.callback(_stop, proc, "worker", True)
    deadline = time.monotonic() + 120
    while not app.control.ping(timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not answer ping (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
    # Ping answers from the parent; wait until the pool process has loaded both models.
    while log.read_text(errors="replace").count("warm in") < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not load its models:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


class Failed(Exception):
    """A variant's call did not complete (e.g. the worker's time limit); the round goes on without it."""


class SentenceTransformersProcess:
    """bench/st_cross_encoder_speed.py as a long-lived subprocess: one request line, one answer line."""

    def __init__(self, checkpoint: Path, threads: int, log: Path, stack: contextlib.ExitStack) -> None:
        self._log_path = log
        self._log: TextIO = log.open("w")
        stack.callback(self._log.close)
        argv = [sys.executable, str(ST_SCRIPT), str(checkpoint), "--threads", str(threads)]
        argv += ["--batch-size", str(CE_BATCH)]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=subprocess_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            encoding="utf-8",
            preexec_fn=_die_with_parent,
        )
        stack.callback(self._close)
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"sentence-transformers process: unexpected first line {self.info}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            raise RuntimeError(
                f"sentence-transformers process exited ({self.proc.poll()}):\n"
                f"{self._log_path.read_text(errors='replace')[-3000:]}"
            )
        return json.loads(line)  # type: ignore[no-any-return]

    def score(self, query: str, documents: list[str]) -> tuple[list[float], float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"query": query, "documents": documents}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        return answer["scores"], float(answer["seconds"])

    def _close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            _stop(self.proc, "sentence-transformers")


# -- the benchmark ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--queries", type=int, default=30, help="test queries drawn (fixed seed)")
    parser.add_argument("--candidates", type=int, default=100, help="bi-encoder top-N re-ranked")
    parser.add_argument("--docs", type=int, default=2000, help="first N corpus documents embedded (+ judged)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query draw")
    parser.add_argument("--threads", type=int, default=0, help="ONNX/torch intra-op threads (0: all cores)")
    parser.add_argument("--no-colbert", action="store_true", help="skip the seeded ColBERT variant")
    parser.add_argument(
        "--repeats", type=int, default=5, help="calls per round of each cheap (warm) variant, interleaved"
    )
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rerank.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_exit)
    console = Console(stderr=True)
    if not (args.beir / "corpus.jsonl").is_file():
        print(f"skipped: {args.beir} is not a BEIR folder (corpus.jsonl missing)", file=sys.stderr)
        return 0
    if not (ROOT / "models" / MODEL / "manifest.json").is_file():
        print(f"error: {ROOT / 'models' / MODEL} is missing: run `make models`", file=sys.stderr)
        return 1
    threads = args.threads or available_cores()
    colbert = not args.no_colbert
    command = ["python", "bench/rerank.py", str(args.beir), "--queries", str(args.queries)]
    command += ["--candidates", str(args.candidates)]
    if args.docs != 2000:
        command += ["--docs", str(args.docs)]
    if args.seed != 0:
        command += ["--seed", str(args.seed)]
    if args.no_colbert:
        command.append("--no-colbert")
    if args.repeats != 5:
        command += ["--repeats", str(args.repeats)]
    load_before = os.getloadavg()

    paths = build_models(args.cache_dir, colbert, console)
    data = load_beir(args.beir, "test")
    qids = random.Random(args.seed).sample(sorted(data.queries), min(args.queries, len(data.queries)))
    ids = subset_ids(data, args.docs)
    count = min(args.candidates, len(ids))
    store = BlobStore(args.cache_dir / "tokens")

    bi = BiEncoderRunner(ROOT / "models" / MODEL, intra_op_threads=threads)
    bi.warmup()
    ce = CrossEncoderRunner(paths[CE_NAME], intra_op_threads=threads)
    ce.warmup()
    ce8 = CrossEncoderRunner(paths[CE_INT8_NAME], intra_op_threads=threads)
    ce8.warmup()
    cb = ColbertRunner(paths[COLBERT_NAME], intra_op_threads=threads) if colbert else None
    if cb is not None:
        cb.warmup()
    console.print(
        f"{data.name}: {len(qids)} of {len(data.queries)} test queries (seed {args.seed}), top-{count} "
        f"candidates from {len(ids)} of {len(data.corpus)} documents; {threads} intra-op threads"
    )

    with _progress(console) as progress:
        doc_vectors = embed_subset(bi, data, ids, store, args.cache_dir, progress)
        query_vectors = bi.embed([data.queries[q] for q in qids])
        cases: list[Case] = []
        for qi, qid in enumerate(qids):
            sims = doc_vectors @ query_vectors[qi]  # both L2-normalised: cosine
            top = np.argsort(-sims, kind="stable")[:count]
            doc_ids = [ids[i] for i in top]
            relevant = sum(1 for d in doc_ids if data.qrels[qid].get(d, 0) > 0)
            cases.append(Case(qid, data.queries[qid], doc_ids, [data.corpus[d] for d in doc_ids], relevant))
        union = list(dict.fromkeys(t for c in cases for t in c.texts))
        li_blobs = ensure_blobs(bi, union, store, progress, "MiniLM token blobs")
        cb_blobs = ensure_blobs(cb, union, store, progress, "ColBERT token blobs") if cb is not None else {}

    with tempfile.TemporaryDirectory(prefix="sieve-bench-rerank-") as tmp, contextlib.ExitStack() as stack:
        # (the stack stops the processes before the folder they work in is removed)
        work = Path(tmp)
        redis_url = start_redis(work, stack)
        client = redis.Redis.from_url(redis_url, socket_timeout=30)
        # The server's SQLite store (WAL, synchronous=FULL), one collection per token model.
        token_store = SqliteStore(work / "sieve.db")
        stack.callback(token_store.close)
        li_cid, li_keys = load_store(token_store, "li", li_blobs)
        cb_cid, cb_keys = load_store(token_store, "colbert", cb_blobs) if cb_blobs else (0, {})
        fmt_spec = TokenFormatSpec(**FMT.to_json())
        models_dir = work / "models"
        models_dir.mkdir()
        (models_dir / MODEL).symlink_to(ROOT / "models" / MODEL)
        for name in (CE_NAME, CE_INT8_NAME, COLBERT_NAME):
            if name in paths:
                (models_dir / name).symlink_to(paths[name].resolve())
        settings: Settings = load_settings(
            {},
            redis_url=redis_url,
            models_dir=models_dir,
            data_dir=work / "data",
            default_embedding_model=MODEL,
            cross_encoder_model=CE_NAME,
        )
        app = create_app(settings)
        console.print(
            "starting a Celery worker (queues embed, colbert, cross_encoder) and the sentence-transformers process"
        )
        start_worker(redis_url, app, models_dir, threads, work / "worker.log", stack)
        st = SentenceTransformersProcess(paths["ce_checkpoint"], threads, work / "st.log", stack)
        dispatcher = Dispatcher(settings)
        stack.callback(dispatcher.close)
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)

        bytes_read: list[int] = []
        st_wall: list[float] = []

        def stored_maxsim(
            cid: int, keys: dict[str, int], runner: Any, case: Case, rows: np.ndarray
        ) -> list[float]:
            """TokenStage._maxsim: the candidates' blobs by key from the store, MaxSim straight from them."""
            wanted = [keys[blob_key(runner, t)] for t in case.texts]
            blobs = token_store.token_blobs(cid, wanted)
            if len(blobs) != len(set(wanted)):
                raise AssertionError(f"{len(set(wanted)) - len(blobs)} candidates have no stored token blob")
            if cid == li_cid:  # the MiniLM stage only (ColBERT blobs are 128-d)
                bytes_read.append(sum(len(blobs[k]) for k in wanted))
            return maxsim_blobs(prepare_query(rows, FMT), [blobs[k] for k in wanted]).tolist()

        def run_li_warm(case: Case) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            # zero-shot: the query's one encoder pass gives the retrieval vector and these token rows
            _, rows = bi.encode([case.query], EMBED_BATCH, tokens=True)
            assert rows is not None
            scores = stored_maxsim(li_cid, li_keys, bi, case, rows[0])
            return time.perf_counter() - t0, scores

        def pending_scores(case: Case, blobs: list[bytes]) -> list[float]:
            # untimed: the fresh blobs must score as the stored ones do (consistency below)
            _, rows = bi.encode([case.query], EMBED_BATCH, tokens=True)
            assert rows is not None
            return maxsim_blobs(prepare_query(rows[0], FMT), blobs).tolist()

        def run_li_pending(case: Case) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            request = DocumentTokensRequest(texts=case.texts, model=MODEL, token_format=fmt_spec)
            result = document_tokens(bi, request, batch_size=EMBED_BATCH)
            elapsed = time.perf_counter() - t0
            return elapsed, pending_scores(case, result.token_blobs())

        def run_ce(runner: CrossEncoderRunner) -> Callable[[Case], tuple[float, list[float]]]:
            def run(case: Case) -> tuple[float, list[float]]:
                t0 = time.perf_counter()
                request = CrossEncoderRequest(
                    query=case.query,
                    model=runner.manifest.name,
                    candidates=[Candidate.of(t) for t in case.texts],
                )
                result = cross_encoder(runner, None, request, batch_size=CE_BATCH)
                return time.perf_counter() - t0, result.scores

            return run

        def run_st(case: Case) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            scores, seconds = st.score(case.query, case.texts)
            st_wall.append(time.perf_counter() - t0)
            return seconds, scores

        def run_li_pending_celery(case: Case) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            try:
                result = loop.run_until_complete(
                    dispatcher.document_tokens(MODEL, case.texts, FMT, CALL_TIMEOUT_S)
                )
            except StageUnavailable as exc:
                raise Failed(str(exc)) from None
            elapsed = time.perf_counter() - t0
            return elapsed, pending_scores(case, result.token_blobs())

        def run_ce_celery(case: Case) -> tuple[float, list[float]]:
            keys = [pair_score_key(ce.manifest.cache_id, case.query, content_hash_hex(t)) for t in case.texts]
            client.delete(*keys)
            t0 = time.perf_counter()
            try:
                result = loop.run_until_complete(
                    dispatcher.cross_encoder(CE_NAME, case.query, case.texts, CALL_TIMEOUT_S)
                )
            except StageUnavailable as exc:
                raise Failed(str(exc)) from None
            elapsed = time.perf_counter() - t0
            if result.cache_hits or result.computed != len(set(keys)):
                raise AssertionError(f"cross-encoder on the worker: {result.cache_hits} cache hits")
            return elapsed, result.scores

        def run_colbert(case: Case) -> tuple[float, list[float]]:
            assert cb is not None
            t0 = time.perf_counter()
            rows = query_tokens(cb, QueryTokensRequest(query=case.query, model=COLBERT_NAME)).rows()
            scores = stored_maxsim(cb_cid, cb_keys, cb, case, rows)
            return time.perf_counter() - t0, scores

        def run_li_warm_blas1(case: Case) -> tuple[float, list[float]]:
            assert threadpool_limits is not None
            with threadpool_limits(limits=1, user_api="blas"):
                return run_li_warm(case)

        # Cheap variants run `repeats` times per round, interleaved with each other (their order rotated
        # each time); heavy ones once. Each round rotates the heavy variants and the cheap block.
        cheap: dict[str, Callable[[Case], tuple[float, list[float]]]] = {
            "li_warm": run_li_warm,
        }
        if threadpool_limits is not None:
            cheap["li_warm_blas1"] = run_li_warm_blas1
        if cb is not None:
            cheap["colbert_warm"] = run_colbert
        heavy: dict[str, Callable[[Case], tuple[float, list[float]]]] = {
            "li_pending": run_li_pending,
            "li_pending_celery": run_li_pending_celery,
            "ce_fp32": run_ce(ce),
            "ce_int8": run_ce(ce8),
            "st_fp32": run_st,
            "ce_fp32_celery": run_ce_celery,
        }
        runs = {**cheap, **heavy}
        names = list(runs)
        for name in names:  # warm-up round on the first query: discarded
            with contextlib.suppress(Failed):
                runs[name](cases[0])
        bytes_read.clear()
        st_wall.clear()
        per_round: dict[str, dict[int, list[float]]] = {name: {} for name in names}
        failures: dict[str, list[dict[str, str]]] = {name: [] for name in names}
        slots = [*heavy, "<cheap>"]
        cheap_names = list(cheap)

        def measure(name: str, r: int, case: Case, progress: Progress) -> None:
            try:
                seconds, scores = runs[name](case)
            except Failed as exc:
                failures[name].append({"query": case.qid, "reason": str(exc)})
                progress.console.print(f"[yellow]{name} failed on query {case.qid}: {exc}[/yellow]")
                return
            per_round[name].setdefault(r, []).append(seconds)
            case.scores[name] = scores

        with _progress(console) as progress:
            task = progress.add_task("rounds (1 per query)", total=len(cases))
            for r, case in enumerate(cases):
                shift = r % len(slots)
                for slot in slots[shift:] + slots[:shift]:
                    if slot != "<cheap>":
                        measure(slot, r, case, progress)
                        continue
                    for i in range(args.repeats):
                        k = (r + i) % len(cheap_names)
                        for name in cheap_names[k:] + cheap_names[:k]:
                            measure(name, r, case, progress)
                advance(progress, task)
        st_info = st.info
        worker_log_tail = (work / "worker.log").read_text(errors="replace")[-2000:]
    timings = {name: [x for r in sorted(per_round[name]) for x in per_round[name][r]] for name in names}
    if any(not timings[name] for name in names):
        print(f"error: a variant never completed: {failures}\n{worker_log_tail}", file=sys.stderr)
        return 1

    load_after = os.getloadavg()
    if "torch" in sys.modules:
        raise AssertionError("the benchmark process imported torch")

    # Consistency: stored blobs and freshly computed ones (in-process or on the worker), and the cross-encoder
    # in-process and through Celery, must give the same scores.
    def max_diff(a: str, b: str) -> float:
        both = [c for c in cases if a in c.scores and b in c.scores]
        return max(float(np.abs(np.subtract(c.scores[a], c.scores[b])).max()) for c in both)

    consistency = {
        "li_warm_vs_li_pending_max_abs_diff": max_diff("li_warm", "li_pending"),
        "li_pending_vs_celery_max_abs_diff": max_diff("li_pending", "li_pending_celery"),
        "ce_fp32_vs_celery_max_abs_diff": max_diff("ce_fp32", "ce_fp32_celery"),
    }
    for what, value in consistency.items():
        if value > 1e-4:
            raise AssertionError(f"{what} = {value:.2e}: the same stage scored differently")

    stats = {name: {"description": VARIANTS[name], **_stats(timings[name])} for name in names}
    p50 = {name: stats[name]["p50_ms"] for name in names}
    pairs_total = sum(len(c.texts) for c in cases)
    pairs_per_s = {
        "st_torch_fp32": pairs_total / sum(timings["st_fp32"]),
        "onnx_fp32": pairs_total / sum(timings["ce_fp32"]),
        "onnx_int8": pairs_total / sum(timings["ce_int8"]),
    }

    def agreement(variant: str) -> dict[str, float]:
        rho = [spearman(c.scores[variant], c.scores["st_fp32"]) for c in cases]
        top = [top_overlap(c.scores[variant], c.scores["st_fp32"]) for c in cases]
        diff = max(float(np.abs(np.subtract(c.scores[variant], c.scores["st_fp32"])).max()) for c in cases)
        return {
            "spearman_mean": round(float(np.mean(rho)), 5),
            "spearman_min": round(float(np.min(rho)), 5),
            f"top{TOP_AGREEMENT}_overlap_mean": round(float(np.mean(top)), 3),
            f"top{TOP_AGREEMENT}_overlap_min": int(np.min(top)),
            "max_abs_score_diff": float(f"{diff:.3g}"),
        }

    int8_vs_fp32 = [spearman(c.scores["ce_int8"], c.scores["ce_fp32"]) for c in cases]

    def overhead(stage: str) -> dict[str, float]:
        # Over the rounds where both completed (all of them unless a worker call failed).
        # Paired: the i-th in-process call of a round with the i-th Celery call of that round.
        inproc, celery = per_round[stage], per_round[f"{stage}_celery"]
        common = [r for r in celery if r in inproc]
        a = float(np.median([x for r in common for x in inproc[r]])) * 1000
        b = float(np.median([x for r in common for x in celery[r]])) * 1000
        paired = [(y - x) * 1000 for r in common for x, y in zip(inproc[r], celery[r], strict=False)]
        return {
            "rounds": len(common),
            "paired_samples": len(paired),
            "in_process_p50_ms": round(a, 3),
            "celery_p50_ms": round(b, 3),
            "overhead_p50_ms": round(b - a, 3),
            "ratio_p50": round(b / a, 4),
            "paired_overhead_median_ms": round(float(np.median(paired)), 3),
            "celery_failures": len(failures[f"{stage}_celery"]),
        }

    result: dict[str, Any] = {
        "benchmark": "rerank",
        "command": shlex.join(command),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": data.name,
        "queries": len(cases),
        "query_seed": args.seed,
        "candidates": count,
        "corpus_documents": len(data.corpus),
        "embedded_documents": len(ids),
        "candidate_selection": (
            f"per query, the bi-encoder ({bi.model_id}) top-{count} by exact cosine over the first "
            f"{args.docs} corpus documents plus every document judged in qrels/test ({len(ids)} documents); "
            f"queries: random.Random({args.seed}).sample(sorted test query ids, {len(cases)})"
        ),
        "relevant_in_candidates_mean": round(float(np.mean([c.relevant_in_candidates for c in cases])), 3),
        "unique_candidate_documents": len(union),
        "models": {
            "late_interaction": bi.model_id,
            "cross_encoder_fp32": ce.model_id,
            "cross_encoder_int8": ce8.model_id,
            **({"colbert": cb.model_id} if cb is not None else {}),
            "note": "cross-encoder and ColBERT are seeded checkpoints (MiniLM encoder + seeded head / "
            "projection): speed and implementation agreement only, no ranking quality",
        },
        "threads": threads,
        "batch_sizes": {
            "ce_fp32": CE_BATCH,
            "ce_int8": 1,
            "st_fp32": CE_BATCH,
            "li_pending_documents": EMBED_BATCH,
        },
        "variants": stats,
        "failures": {name: f for name, f in failures.items() if f},
        "worker_time_limits_s": {
            "document_tokens": list(TIME_LIMITS[TASK_DOCUMENT_TOKENS]),
            "cross_encoder": list(TIME_LIMITS[TASK_CROSS_ENCODER]),
        },
        "ratios": {
            "ce_fp32_over_li_warm_p50": round(p50["ce_fp32"] / p50["li_warm"], 2),
            "ce_int8_over_li_warm_p50": round(p50["ce_int8"] / p50["li_warm"], 2),
            "li_pending_over_li_warm_p50": round(p50["li_pending"] / p50["li_warm"], 2),
            **(
                {
                    "ce_fp32_over_li_warm_blas1_p50": round(p50["ce_fp32"] / p50["li_warm_blas1"], 2),
                    "li_warm_over_li_warm_blas1_p50": round(p50["li_warm"] / p50["li_warm_blas1"], 3),
                }
                if "li_warm_blas1" in p50
                else {}
            ),
            "target_ce_over_li_warm": 20,
            **(
                {"colbert_warm_over_li_warm_p50": round(p50["colbert_warm"] / p50["li_warm"], 3)}
                if cb is not None
                else {}
            ),
        },
        "celery_overhead": {"li_pending": overhead("li_pending"), "ce_fp32": overhead("ce_fp32")},
        "celery_overhead_note": "the in-server late-interaction stage (li_warm) has no worker counterpart any "
        "more (MaxSim runs in the server from the store); late interaction's Celery overhead is measured on "
        "sieve.document_tokens, the task that fills pending documents",
        "cross_encoder_backends": {
            "pairs_per_s": {k: round(v, 2) for k, v in pairs_per_s.items()},
            "onnx_fp32_over_st": round(pairs_per_s["onnx_fp32"] / pairs_per_s["st_torch_fp32"], 3),
            "onnx_int8_over_st": round(pairs_per_s["onnx_int8"] / pairs_per_s["st_torch_fp32"], 3),
            "onnx_int8_over_fp32": round(pairs_per_s["onnx_int8"] / pairs_per_s["onnx_fp32"], 3),
            "agreement_vs_st": {"onnx_fp32": agreement("ce_fp32"), "onnx_int8": agreement("ce_int8")},
            "int8_vs_fp32_spearman_mean": round(float(np.mean(int8_vs_fp32)), 5),
            "st_round_trip_p50_ms": round(float(np.median(st_wall)) * 1000, 3),
            "st_process": st_info,
            "note": "pairs/s = all pairs / total seconds over the rounds; ONNX fp32 batches 16 pairs per run, "
            "int8 runs one pair per run (dynamic quantization scales activations per batch); ST is timed "
            "inside its process around CrossEncoder.predict",
        },
        "late_interaction": {
            "bytes_read_per_query_mean": round(float(np.mean(bytes_read)), 1) if bytes_read else None,
            "token_format": FMT.describe(),
            "token_source": "server/storage/store.py tokens table (temporary SQLite file)",
        },
        "consistency": {k: float(f"{v:.3g}") for k, v in consistency.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "cores_available": available_cores(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": metadata.version("onnxruntime"),
            "torch": metadata.version("torch"),
            "sentence_transformers": metadata.version("sentence-transformers"),
            "transformers": metadata.version("transformers"),
            "celery": metadata.version("celery"),
            "redis_server": subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True
            ).stdout.strip(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _print_summary(result)
    console.print(f"wrote {args.out}")
    return 0


def _print_summary(r: dict[str, Any]) -> None:
    out = Console(width=None if sys.stdout.isatty() else 130)
    table = Table(title=f"{r['dataset']}: re-ranking {r['candidates']} candidates, {r['queries']} queries")
    for column in ("variant", "p50 ms", "p90 ms", "mean ms", "what"):
        table.add_column(column, justify="left" if column in ("variant", "what") else "right")
    for name, s in r["variants"].items():
        table.add_row(
            name, f"{s['p50_ms']:.1f}", f"{s['p90_ms']:.1f}", f"{s['mean_ms']:.1f}", s["description"]
        )
    out.print(table)
    ratios, celery, be = r["ratios"], r["celery_overhead"], r["cross_encoder_backends"]
    out.print(
        f"CE fp32 / warm LI p50: {ratios['ce_fp32_over_li_warm_p50']:.0f}x (target >= 20x); "
        f"CE int8 / warm LI: {ratios['ce_int8_over_li_warm_p50']:.0f}x; pending / warm: {ratios['li_pending_over_li_warm_p50']:.0f}x"
    )
    for stage, o in celery.items():
        out.print(
            f"Celery {stage}: {o['in_process_p50_ms']:.1f} -> {o['celery_p50_ms']:.1f} ms p50 "
            f"(+{o['overhead_p50_ms']:.1f} ms, x{o['ratio_p50']:.2f}; paired median +{o['paired_overhead_median_ms']:.1f} ms)"
        )
    pps = be["pairs_per_s"]
    out.print(
        f"pairs/s: ST {pps['st_torch_fp32']:.1f}, ONNX fp32 {pps['onnx_fp32']:.1f} ({be['onnx_fp32_over_st']:.2f}x), "
        f"ONNX int8 {pps['onnx_int8']:.1f} ({be['onnx_int8_over_st']:.2f}x)"
    )
    for variant, a in be["agreement_vs_st"].items():
        out.print(
            f"{variant} vs ST: Spearman mean {a['spearman_mean']:.4f} min {a['spearman_min']:.4f}, "
            f"top-{TOP_AGREEMENT} overlap mean {a[f'top{TOP_AGREEMENT}_overlap_mean']:.2f} "
            f"min {a[f'top{TOP_AGREEMENT}_overlap_min']}, max |diff| {a['max_abs_score_diff']:.2g}"
        )


if __name__ == "__main__":
    sys.exit(main())
