"""`make bench` / `make bench-quick`: every benchmark section, one after the other, then plots and the report.

    .venv/bin/python bench/run.py [--quick] [--beir ../shared/datasets/scifact] [--only NAME ...] [--skip NAME ...]

Each section is its own process (a crash or a leaked thread pool in one cannot skew the next) and writes
its own bench/results/<name>.json with the machine, the library versions, the mode, its wall time and
the exact command that reproduces it; a quick run writes bench/results/quick/<name>.json instead, so that
it never replaces a full run's figures. bench/report.py and bench/plots.py take a full result where one
exists, else the quick one, and label every row and plot with the mode it came from. Sections, in order:

    service   bench/scaling.py service BEIR: a real `sieve run` (server, Redis, embed + colbert workers);
              quality per cascade through gRPC Search, the physical floor (bare in-process work of each
              stage), latency/throughput vs client concurrency with and without late interaction
    ann       bench/ann.py: usearch vs FAISS HNSW vs exact search, SciFact embeddings + synthetic
    corpus    bench/scaling.py corpus: the server's VectorIndex vs corpus size (synthetic vectors)
    bi        bench/bi_encoder.py: ONNX runner vs sentence-transformers encode (texts/s)
    late      bench/late_interaction_peers.py: warm ColBERT stage vs colbert-ai (and PyLate) (ms/query)
    rerank    bench/rerank.py: cross-encoder ONNX fp32/int8 vs sentence-transformers, Celery overhead
              (another benchmark; run when the file exists)

then bench/plots.py (PNGs in bench/results/plots/) and bench/report.py (bench/REPORT.md and the README
table). The service section runs first: it embeds the corpus once and leaves the document and query
vectors and each query's candidates in bench/.cache for the ANN and late-interaction sections.

--quick bounds the run: the service section indexes a SciFact subset (every judged document + the first
documents up to 600) instead of the whole corpus, the synthetic corpora stop at 10k vectors instead of
1M, and every section measures fewer queries. Each section also has a share of a 9-minute budget (a margin over
what it took here on a busy machine; a section out of time is stopped, its services with it, what it measured
so far is kept, and the report says so), so the run ends within 10 minutes however busy the machine is.
--beir must be a BEIR folder (by default ../shared/datasets/scifact, beside the repository): the run stops
at once if it is not, rather than skip most sections. `--prepare` builds the seeded cross-encoder and ColBERT checkpoints and bundles once (a minute or two;
`make bench-quick` runs it before the timed run, as `make models` exports the bi-encoder). Quick figures are marked as such in the report; quality
on a subset is not comparable with published figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
QUICK_RESULTS = RESULTS / "quick"  # quick-mode results: never overwrite a full run's
# Seeded models, embeddings and indexes that later runs reuse (gitignored). SIEVE_BENCH_CACHE points
# elsewhere, e.g. an empty folder to time a run as on a clean machine.
CACHE = Path(os.environ.get("SIEVE_BENCH_CACHE") or BENCH / ".cache").resolve()
DEFAULT_BEIR = ROOT.parent / "shared" / "datasets" / "scifact"
MODEL = "all-MiniLM-L6-v2"

# Packages whose versions every result records (absent ones are recorded as null).
VERSIONED = (
    "numpy",
    "onnxruntime",
    "tokenizers",
    "usearch",
    "grpcio",
    "celery",
    "redis",
    "faiss-cpu",
    "torch",
    "transformers",
    "sentence-transformers",
    "colbert-ai",
    "matplotlib",
)

_STARTED = time.monotonic()


# -- helpers shared by the section scripts (they import this module as `run`) --------------------------


def log(message: str) -> None:
    """Progress on stderr, with the time since this process started."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


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


def versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    processor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cores_available": available_cores(),
        "processor": processor,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
    }


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a result, relative to the repository root."""
    return shlex.join(["python", script, *argv])


def write_result(name: str, payload: dict[str, Any], *, command: str, quick: bool, started: float) -> Path:
    """bench/results/<name>.json (quick: bench/results/quick/<name>.json) with the command, mode, date,
    wall time and machine."""
    record = {
        "benchmark": payload.pop("benchmark", name),
        "command": command,
        "mode": "quick" if quick else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - started, 1),
        **payload,
        "machine": machine_info(),
    }
    directory = QUICK_RESULTS if quick else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    log(f"wrote {path.relative_to(ROOT)}")
    return path


def percentiles(values_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean of a list of milliseconds (nearest-rank-free: numpy's linear interpolation)."""
    import numpy as np

    a = np.asarray(values_ms, dtype=np.float64)
    if a.size == 0:
        return {
            "p50_ms": float("nan"),
            "p90_ms": float("nan"),
            "p99_ms": float("nan"),
            "mean_ms": float("nan"),
        }
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "mean_ms": round(float(a.mean()), 3),
        "samples": int(a.size),
    }


async def search_pass(
    address: str, requests: list[Any], clients: int, channel_options: list[tuple[str, Any]] | None = None
) -> dict[str, Any]:
    """One concurrency pass: `clients` asyncio clients on one channel take the next of `requests`
    (SearchRequest messages) until none is left, so each is sent once. Returns the completed calls'
    latencies (`latency_ms`), failed calls by status code (`errors`), responses with a DEGRADED stage
    (`degraded`), and the pass's wall and client CPU seconds."""
    import asyncio

    import grpc
    from sieve.v1 import search_pb2, search_pb2_grpc

    latencies: list[float] = []
    errors: dict[str, int] = {}
    degraded = 0
    pending = iter(requests)
    async with grpc.aio.insecure_channel(address, options=channel_options) as channel:
        search = search_pb2_grpc.SearchServiceStub(channel)

        async def client() -> None:
            nonlocal degraded
            for request in pending:  # shared iterator: each request is sent once
                t = time.perf_counter()
                try:
                    response = await search.Search(request, timeout=120)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                latencies.append((time.perf_counter() - t) * 1000)
                degraded += any(r.status == search_pb2.STAGE_STATUS_DEGRADED for r in response.stages)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "latency_ms": latencies,
        "errors": errors,
        "degraded": degraded,
        "wall_s": wall,
        "client_cpu_s": cpu,
    }


class JsonLinesProcess:
    """A helper process spoken to in JSON lines (a reference library in an interpreter of its own, so this
    one never imports torch): its first line says it is ready (`info`); then one request line in, one
    answer line out. Its stderr goes to `log` when given (quoted when it dies), else to ours."""

    def __init__(
        self,
        argv: list[str],
        name: str,
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        preexec_fn: Any = None,
        close_wait_s: float = 30,
    ) -> None:
        self.name = name
        self._log_path = log
        self._log = log.open("w") if log is not None else None
        self._close_wait_s = close_wait_s
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            encoding="utf-8",
            preexec_fn=preexec_fn,
        )
        try:
            self.info = self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            tail = ""
            if self._log is not None and self._log_path is not None:
                self._log.flush()
                tail = ":\n" + self._log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the {self.name} process exited ({self.proc.poll()}){tail}")
        return json.loads(line)

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(self._close_wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._log is not None:
            self._log.close()


# -- the driver --------------------------------------------------------------------------------------


# Seeded checkpoints of the real architectures (no trained cross-encoder or ColBERT weights are reachable
# here) and their ONNX bundles, in bench/rerank.py's names and layout so that both use one copy.
SEED_LABEL = "seeded:all-MiniLM-L6-v2/0"
SEEDED = {
    "colbert-seeded-minilm": (
        "sieve_core.models.export_colbert",
        ["colbert", "--name", "colbert-seeded-minilm"],
    ),
    "ce-seeded-minilm": ("sieve_core.models.export_cross_encoder", ["cross-encoder", "--int8"]),
}


def build_seeded(name: str) -> tuple[Path, Path]:
    """(checkpoint, bundle) of a seeded model under CACHE, each built only when missing."""
    from sieve_core.models.export import subprocess_env

    seeder, export = SEEDED[name]
    checkpoint, bundle = CACHE / "checkpoints" / name, CACHE / "models" / name
    steps = []
    if not (checkpoint / "config.json").is_file():
        steps.append([sys.executable, "-m", seeder, "seed", "--out", str(checkpoint)])
    bundles = [bundle] + ([bundle.with_name(name + "-int8")] if "--int8" in export else [])
    if not all((b / "manifest.json").is_file() for b in bundles):
        steps.append(
            [sys.executable, "-m", "sieve_core.models.export", export[0], "--source", str(checkpoint)]
            + ["--out", str(bundle), *export[1:], "--source-label", SEED_LABEL]
        )
    for cmd in steps:
        bundle.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        log(f"building {name}: {shlex.join(cmd[1:])}")
        done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"failed: {shlex.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return checkpoint, bundle


QUICK_BUDGET_S = 540  # --quick must end within 10 minutes, plots and report included


def sections(quick: bool, beir: Path) -> list[tuple[str, list[str], float]]:
    """(name, argv after the interpreter, timeout in seconds) of every section, in order."""
    q = ["--quick"] if quick else []
    hour = 3600.0
    # Quick-mode caps: a margin over what each section took on this 2-core machine at a load average of
    # about 6, and never more than what is left of QUICK_BUDGET_S (the last section gets whatever is left).
    out: list[tuple[str, list[str], float]] = [
        ("service", ["bench/scaling.py", "service", str(beir), *q], 185 if quick else 6 * hour),
        # ann before corpus: the corpus section reuses the indexes ann builds (same vectors, same settings)
        ("ann", ["bench/ann.py", "--beir", str(beir), *q], 40 if quick else 6 * hour),
        ("corpus", ["bench/scaling.py", "corpus", *q], 25 if quick else 4 * hour),
        ("bi", ["bench/bi_encoder.py", str(beir), *q], 60 if quick else hour),
        ("late", ["bench/late_interaction_peers.py", str(beir), *q], 95 if quick else hour),
    ]
    if (BENCH / "rerank.py").is_file():  # another benchmark (cross-encoder peers, Celery overhead)
        rerank = ["bench/rerank.py", str(beir)]
        rerank += ["--queries", "2", "--candidates", "50", "--docs", "50"] if quick else ["--queries", "30"]
        rerank += ["--cache-dir", str(CACHE)]
        if quick:  # it has no mode of its own: keep its quick figures apart from a full run's
            rerank += ["--out", str(QUICK_RESULTS / "rerank.json")]
        out.append(("rerank", rerank, 300 if quick else 3 * hour))  # quick: what is left of the budget
    return out


def run_section(argv: list[str], timeout: float, env: dict[str, str]) -> str:
    """Runs one section in its own process group; past its time, SIGTERM to the group (the sections stop
    the services they started), then SIGKILL to whatever is left."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=max(timeout, 1))
        return "ok" if code == 0 else f"exit {code}"
    except subprocess.TimeoutExpired:
        log(f"time is up ({timeout:.0f} s): stopping {argv[0]}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"stopped after {timeout:.0f} s"
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="bounded run (minutes), smaller inputs")
    parser.add_argument("--beir", type=Path, default=DEFAULT_BEIR, help="BEIR folder (default: SciFact)")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these sections")
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="skip these sections")
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only build the seeded models the sections use (once), then exit",
    )
    args = parser.parse_args(argv)
    if args.prepare:
        for name in SEEDED:
            build_seeded(name)
        log(f"seeded models ready in {CACHE}")
        return 0
    started = time.monotonic()
    if not (args.beir / "corpus.jsonl").is_file():
        # Most sections need it: without it a run would "succeed" with half its report missing.
        print(
            f"error: {args.beir} ({args.beir.resolve()}) is not a BEIR folder (no corpus.jsonl). The data sets "
            "live beside the repository in ../shared/datasets; from a checkout elsewhere pass --beir DIR.",
            file=sys.stderr,
        )
        return 2
    if not (ROOT / "models" / MODEL / "manifest.json").is_file():
        print(f"error: models/{MODEL} is missing: run `make models`", file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    statuses: list[dict[str, Any]] = []
    for name, section_argv, timeout in sections(args.quick, args.beir):
        if (args.only and name not in args.only) or name in args.skip:
            continue
        if args.quick:  # never past the quick budget, whatever the machine's load
            timeout = min(timeout, QUICK_BUDGET_S - (time.monotonic() - started))
            if timeout < 20:
                statuses.append({"section": name, "status": "skipped: quick budget spent", "seconds": 0.0})
                log(f"== section {name}: skipped, the quick budget is spent")
                continue
        log(f"== section {name} (at most {timeout:.0f} s): {shlex.join(section_argv)}")
        t0 = time.monotonic()
        status = run_section(section_argv, timeout, env)
        seconds = round(time.monotonic() - t0, 1)
        statuses.append({"section": name, "status": status, "seconds": seconds, "argv": section_argv})
        log(f"== section {name}: {status} in {seconds:.0f} s (total {time.monotonic() - started:.0f} s)")
    if not args.only and not args.skip:
        # The run record (wall time of the whole run, each section's status) only for a complete run.
        command = command_line(
            "bench/run.py", (["--quick"] if args.quick else []) + ["--beir", str(args.beir)]
        )
        write_result(
            "run",
            {"benchmark": "run", "sections": statuses},
            command=command,
            quick=args.quick,
            started=started,
        )
    for script in ("plots.py", "report.py"):
        code = subprocess.run([sys.executable, str(BENCH / script)], cwd=ROOT, env=env).returncode
        if code != 0:
            statuses.append({"section": script, "status": f"exit {code}"})
    failed = [s for s in statuses if s["status"] != "ok"]
    log(f"done in {time.monotonic() - started:.0f} s; {len(failed)} step(s) not ok: {failed}")
    log("report: bench/REPORT.md, plots: bench/results/plots/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
