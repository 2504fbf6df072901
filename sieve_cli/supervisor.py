"""`sieve run`: the whole service as one supervised unit (what `make run` starts).

Starts a local redis-server on a private loopback port when SIEVE_REDIS_URL is unset, one Celery worker
per queue in SIEVE_RUN_WORKER_QUEUES (plus `cross_encoder` when SIEVE_CROSS_ENCODER_MODEL is set), then
the gRPC server.

A worker or the local Redis that dies (the kernel's OOM killer, a crash, `kill -9`) is started again,
after a backoff that doubles from 1 s up to 30 s while it keeps dying and starts over once it has stayed
up for a minute. Each restart is logged on stderr and counted in the server's metrics
(`sieve_run_restarts_total{child}`, `sieve_run_child_up{child}`), read from a small state file the
supervisor keeps (SIEVE_RUN_STATE_FILE). Meanwhile the server keeps serving: re-ranking stages that need
a worker are reported DEGRADED and searches still answer within their deadline.

Only Ctrl-C, SIGTERM or the server's own death stop the unit, in reverse order: the server first (it
drains calls and snapshots its indexes), then the workers (warm shutdown: running tasks finish), then
Redis. Exit code 0 after a signal, 1 when the server died or could not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from sieve_cli.ports import first_busy
from sieve_core import redis_conn
from sieve_core.config import Settings, load_settings

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # up this long: the next death starts the backoff over
POLL_S = 0.2


def say(message: str) -> None:
    print(f"sieve run: {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    restartable: bool = True  # the server is not: its death stops the unit
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None  # dead, to be started again at this monotonic time
    stdout: int | None = None

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which stops children in order, and
        # killpg reaches a worker's pool processes too.
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.stdout, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None

    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _wait_redis(settings: Settings, url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    client = redis_conn.client(settings, timeout_s=1, url=url)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.1)
    raise TimeoutError(f"redis-server did not answer at {url} within {timeout:.0f}s")


def local_redis(settings: Settings) -> tuple[Child, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: run scripts/ensure_redis.sh, or set SIEVE_REDIS_URL")
    directory = settings.data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    port = settings.local_redis_port
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory.resolve())]
    # Append-only file: a restarted Redis comes back with the queues and caches it had.
    argv += ["--appendonly", "yes", "--save", "", "--protected-mode", "yes", "--daemonize", "no"]
    # Bounded memory: evict only keys with a TTL, least recently used first: the caches (and stale Celery
    # results); never the Celery queues, which have no TTL.
    argv += ["--maxmemory", settings.local_redis_maxmemory, "--maxmemory-policy", "volatile-lru"]
    return Child("redis", argv, stdout=subprocess.DEVNULL), f"redis://127.0.0.1:{port}/0"


def worker_argv(queue: str, concurrency: int, log_level: str = "INFO") -> list[str]:
    from sieve_core.tasking import QUEUES

    if queue not in QUEUES:
        raise SystemExit(f"unknown worker queue {queue!r}; expected one of {', '.join(QUEUES)}")
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queue]
    return argv + ["-c", str(concurrency), "-n", f"sieve-{queue}@%h", "--loglevel", log_level]


def worker_queues(settings: Settings) -> list[str]:
    queues = [q.strip() for q in settings.run_worker_queues.split(",") if q.strip()]
    if settings.cross_encoder_model and "cross_encoder" not in queues:
        queues.append("cross_encoder")
    return list(dict.fromkeys(queues))


def _kill_group(child: Child) -> None:
    """SIGKILL what is left of a child's process group (a dead worker's orphaned pool processes)."""
    if child.proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)


def _stop(child: Child, timeout: float = 30.0) -> None:
    proc = child.proc
    if proc is None or proc.poll() is not None:
        _kill_group(child)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"{child.name} did not stop in {timeout:.0f}s; killing it")
        _kill_group(child)
        proc.wait()
    _kill_group(child)


class StateFile:
    """Restarts and liveness per child, as JSON the server's metrics endpoint reads at scrape time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, children: list[Child]) -> None:
        state = {c.name: {"restarts": c.restarts, "up": c.up()} for c in children if c.restartable}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "children": state}))
        tmp.replace(self.path)  # atomic: a scrape never reads half a file


class Supervisor:
    def __init__(self, children: list[Child], state: StateFile) -> None:
        self.children = children
        self.state = state

    def check(self) -> int | None:
        """One look at every child: restart what is due, schedule what died. An exit code when the
        server is gone (the unit stops), else None."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
                    changed = True
                continue
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            if not child.restartable:
                say(f"{child.name} exited with code {code}; stopping everything")
                if changed:  # a restart earlier in this look still reaches the state file
                    self.state.write(self.children)
                return 1
            self._schedule(child, code, now)
            changed = True
        if changed:
            self.state.write(self.children)
        return None

    def _schedule(self, child: Child, code: int, now: float) -> None:
        _kill_group(child)  # pool processes of a killed worker parent would hold tasks and memory
        if now - child.started_at >= STABLE_AFTER_S:
            child.backoff_s = BACKOFF_FIRST_S
        child.restart_at = now + child.backoff_s
        say(
            f"{child.name} exited with code {code}; restarting it in {child.backoff_s:g}s "
            f"(restart {child.restarts + 1}); the server keeps serving meanwhile (degraded)"
        )
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def _restart(self, child: Child) -> None:
        child.restarts += 1
        try:
            child.start()
        except OSError as exc:  # e.g. the binary vanished: try again later
            say(f"cannot start {child.name}: {exc}")
            child.restart_at = time.monotonic() + child.backoff_s
            return
        say(f"{child.name} started again (pid {child.proc.pid if child.proc else '?'})")


def _busy_ports(settings: Settings) -> str | None:
    wanted = []
    if settings.redis_url is None:
        address = f"127.0.0.1:{settings.local_redis_port}"
        wanted.append(("the local Redis", address, "SIEVE_LOCAL_REDIS_PORT"))
    wanted.append(("the gRPC server", settings.grpc_address, "SIEVE_GRPC_ADDRESS"))
    wanted.append(("the metrics endpoint", settings.metrics_address, "SIEVE_METRICS_ADDRESS"))
    return first_busy("sieve run", wanted)


def _start_redis(settings: Settings, env: dict[str, str], children: list[Child]) -> None:
    if settings.redis_url is not None:
        print(f"sieve run: using Redis at {redis_conn.describe(settings)}", flush=True)
        return
    child, url = local_redis(settings)
    child.start()
    children.append(child)
    _wait_redis(settings, url, child.proc)  # type: ignore[arg-type]
    env["SIEVE_REDIS_URL"] = url
    print(f"sieve run: redis-server on {url} (data in {settings.data_dir / 'redis'})", flush=True)


def run(settings: Settings | None = None) -> int:
    settings = settings or load_settings()
    env = dict(os.environ)
    children: list[Child] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    try:  # Redis settings that cannot work stop `sieve run` before any child starts
        redis_conn.ssl_options(settings, None if settings.redis_url else "redis://127.0.0.1/0")
    except redis_conn.RedisConfigError as exc:
        raise SystemExit(f"sieve run: {exc}") from None
    busy = _busy_ports(settings)
    if busy:
        print(busy, file=sys.stderr)
        return 1
    state = StateFile(settings.run_state_file or settings.data_dir / "run" / "state.json")
    env["SIEVE_RUN_STATE_FILE"] = str(state.path.resolve())
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        _start_redis(settings, env, children)
        # MaxSim is small matrix products: numpy's multi-threaded BLAS only adds contention (measured by
        # bench/rerank.py: 35 ms p50 with 1 BLAS thread vs 77 ms with 2 on a busy 2-core machine).
        worker_env = {"OPENBLAS_NUM_THREADS": "1", **env}
        for queue in worker_queues(settings):
            argv = worker_argv(queue, settings.run_worker_concurrency, settings.log_level)
            worker = Child(f"worker-{queue}", argv, worker_env)
            worker.start()
            children.append(worker)
            print(f"sieve run: Celery worker on queue {queue!r}", flush=True)
        server = Child("server", [sys.executable, "-m", "sieve_cli.main", "serve"], env, restartable=False)
        server.start()
        children.append(server)
        supervisor = Supervisor(children, state)
        state.write(children)
        print(f"sieve run: gRPC server on {settings.grpc_address}; Ctrl-C stops everything", flush=True)
        while not stopping:
            code = supervisor.check()
            if code is not None:
                return code
            time.sleep(POLL_S)
        return 0
    finally:
        for child in reversed(children):
            _stop(child)
        with contextlib.suppress(OSError):
            state.path.unlink()
