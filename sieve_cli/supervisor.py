"""`sieve run`: the whole service as one supervised unit (what `make run` starts).

Starts a local redis-server on a private loopback port when SIEVE_REDIS_URL is unset, one Celery worker
per queue in SIEVE_RUN_WORKER_QUEUES (plus `cross_encoder` when SIEVE_CROSS_ENCODER_MODEL is set), then
the gRPC server. Ctrl-C or SIGTERM stops everything in
reverse order: the server first (it drains calls and snapshots its indexes), then the workers (warm
shutdown: running tasks finish), then Redis. If any child dies, the others are stopped and the command
exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import redis

from sieve_core import redis_conn
from sieve_core.config import Settings, load_settings


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None  # type: ignore[type-arg]


def _wait_redis(settings: Settings, url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:  # type: ignore[type-arg]
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
    argv = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(directory.resolve()),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--protected-mode",
        "yes",
        # Bounded memory: evict only keys with a TTL, least recently used first: the caches (and stale
        # Celery results); never the Celery queues, which have no TTL.
        "--maxmemory",
        settings.local_redis_maxmemory,
        "--maxmemory-policy",
        "volatile-lru",
        "--daemonize",
        "no",
    ]
    return Child("redis", argv), f"redis://127.0.0.1:{port}/0"


def worker_argv(queue: str, concurrency: int, log_level: str = "INFO") -> list[str]:
    from sieve_core.tasking import QUEUES

    if queue not in QUEUES:
        raise SystemExit(f"unknown worker queue {queue!r}; expected one of {', '.join(QUEUES)}")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        queue,
        "-c",
        str(concurrency),
        "-n",
        f"sieve-{queue}@%h",
        "--loglevel",
        log_level,
    ]


def worker_queues(settings: Settings) -> list[str]:
    queues = [q.strip() for q in settings.run_worker_queues.split(",") if q.strip()]
    if settings.cross_encoder_model and "cross_encoder" not in queues:
        queues.append("cross_encoder")
    return list(dict.fromkeys(queues))


def _stop(child: Child, timeout: float = 30.0) -> None:
    proc = child.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"sieve run: {child.name} did not stop in {timeout:.0f}s; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the whole group, pool processes too
        proc.wait()


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
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if settings.redis_url is None:
            child, url = local_redis(settings)
            # Own process group: a terminal's Ctrl-C reaches only this supervisor, which stops children in order.
            child.proc = subprocess.Popen(child.argv, stdout=subprocess.DEVNULL, start_new_session=True)
            children.append(child)
            _wait_redis(settings, url, child.proc)
            env["SIEVE_REDIS_URL"] = url
            print(f"sieve run: redis-server on {url} (data in {settings.data_dir / 'redis'})", flush=True)
        else:
            print(f"sieve run: using Redis at {redis_conn.describe(settings)}", flush=True)
        for queue in worker_queues(settings):
            # MaxSim is small matrix products: numpy's multi-threaded BLAS only adds contention (measured
            # by bench/rerank.py: 35 ms p50 with 1 BLAS thread vs 77 ms with 2 on a busy 2-core machine).
            worker_env = {"OPENBLAS_NUM_THREADS": "1", **env}
            argv = worker_argv(queue, settings.run_worker_concurrency, settings.log_level)
            worker = Child(f"worker-{queue}", argv, worker_env)
            worker.proc = subprocess.Popen(worker.argv, env=worker_env, start_new_session=True)
            children.append(worker)
            print(f"sieve run: Celery worker on queue {queue!r}", flush=True)
        server = Child("server", [sys.executable, "-m", "sieve_cli.main", "serve"], env)
        server.proc = subprocess.Popen(server.argv, env=env, start_new_session=True)
        children.append(server)
        print(f"sieve run: gRPC server on {settings.grpc_address}; Ctrl-C stops everything", flush=True)
        while not stopping:
            for child in children:
                if child.proc is not None and child.proc.poll() is not None:
                    print(
                        f"sieve run: {child.name} exited with code {child.proc.returncode}; stopping",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        for child in reversed(children):
            _stop(child)
