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

from sieve_cli.stack import free_port, wait_serving
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


def test_supervisor_restarts_a_dying_child_with_doubling_backoff_and_stops_on_the_server(
    tmp_path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    """The restart policy of `sieve run` on real (tiny) processes: a child that keeps dying is started
    again after 0.1, 0.2, 0.4 s...; each restart is counted in the state file the metrics read; the
    server child's death ends the loop with exit code 1."""
    import json as _json

    from sieve_cli import supervisor

    monkeypatch.setattr(supervisor, "BACKOFF_MAX_S", 0.4)
    dying = supervisor.Child("worker-x", [sys.executable, "-c", "raise SystemExit(3)"], backoff_s=0.1)
    server = supervisor.Child(
        "server", [sys.executable, "-c", "import time; time.sleep(3)"], restartable=False
    )
    state = supervisor.StateFile(tmp_path / "state.json")
    unit = supervisor.Supervisor([dying, server], state)
    dying.start()
    server.start()
    starts = [time.monotonic()]
    code = None
    while code is None:
        before = dying.restarts
        code = unit.check()
        if dying.restarts > before:
            starts.append(time.monotonic())
        time.sleep(0.01)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert code == 1 and dying.restarts >= 4
    # Each gap is the backoff (plus the child's own short life): doubling from 0.1, capped at 0.4 s.
    assert 0.1 <= gaps[0] < 0.4 and gaps[1] >= 0.2 and all(0.4 <= g < 1.5 for g in gaps[2:])
    recorded = _json.loads(state.path.read_text())["children"]
    # `up` is a snapshot: the child may have died again since the file was written (it exits at once).
    assert set(recorded) == {"worker-x"} and recorded["worker-x"]["restarts"] == dying.restarts
    assert isinstance(recorded["worker-x"]["up"], bool)
    err = capsys.readouterr().err
    assert "worker-x exited with code 3; restarting it in" in err
    assert "server exited with code 0; stopping everything" in err
