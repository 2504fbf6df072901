"""`sieve run` (what `make run` starts): a local Redis and the server as one unit, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis

from sieve_cli.evaluate import free_port, wait_serving
from sieve_core.config import load_settings
from tests.conftest import MODELS_DIR, ROOT, require_bundle
from workers.celery_app import create_app


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sieve_run_starts_redis_and_server_and_stops_on_ctrl_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_bundle()
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it via scripts/ensure_redis.sh)")
    grpc_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "SIEVE_REDIS_URL"}
    env.update(
        SIEVE_DATA_DIR=str(tmp_path),
        SIEVE_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}",
        SIEVE_METRICS_ADDRESS="",
        SIEVE_LOCAL_REDIS_PORT=str(redis_port),
        SIEVE_MODELS_DIR=str(MODELS_DIR),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sieve_cli.main", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", timeout=60, proc=proc)
        local = redis.Redis(port=redis_port, socket_timeout=2, decode_responses=True)
        assert local.ping()
        # Bounded, and only keys with a TTL (the caches) are evicted, never the Celery queues.
        assert local.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
        assert int(local.config_get("maxmemory")["maxmemory"]) == 1024**3
        assert (tmp_path / "redis").is_dir()
        # One Celery worker per default queue answers a ping through the local Redis.
        app = create_app(load_settings({"SIEVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}))
        names: set[str] = set()
        deadline = time.monotonic() + 60
        while names != {"sieve-embed", "sieve-colbert"} and time.monotonic() < deadline:
            names = {name.split("@")[0] for reply in app.control.ping(timeout=1.0) for name in reply}
        assert names == {"sieve-embed", "sieve-colbert"}
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "redis-server on redis://127.0.0.1:" in out
        assert not _port_open(grpc_port) and not _port_open(redis_port), "a child outlived `sieve run`"
        assert "Celery worker on queue 'embed'" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sieve_run_starts_nothing_when_the_grpc_port_is_taken(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SIEVE_REDIS_URL"}
    # A port that is already taken: one line says so before any child starts (no Redis left behind). The
    # server's death in a running stack, which stops the unit, is in tests/system/test_newcomer.py.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.update(
            SIEVE_DATA_DIR=str(tmp_path),
            SIEVE_GRPC_ADDRESS=f"127.0.0.1:{taken.getsockname()[1]}",
            SIEVE_LOCAL_REDIS_PORT=str(redis_port),
            SIEVE_MODELS_DIR=str(MODELS_DIR),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "sieve_cli.main", "run"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert "is already in use" in proc.stderr and "SIEVE_GRPC_ADDRESS" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not _port_open(redis_port)


def test_worker_queues_add_cross_encoder_when_a_model_is_configured() -> None:
    from sieve_cli.supervisor import worker_queues

    assert worker_queues(load_settings({})) == ["embed", "colbert"]
    with_model = load_settings({"SIEVE_CROSS_ENCODER_MODEL": "ms-marco-MiniLM-L-6-v2"})
    assert worker_queues(with_model) == ["embed", "colbert", "cross_encoder"]
