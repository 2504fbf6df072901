"""Starting Sieve's processes from Python: one way, for `sieve eval`, the tests and the benchmarks alike.

- `free_port()` and `wait_serving()`: a loopback port, and waiting for the gRPC health check to say SERVING.
- `sieve_process(command, ...)`: a `sieve serve` or `sieve run` child with exactly the SIEVE_* settings given
  (the caller's SIEVE_* variables are dropped, so a developer's environment cannot change a test), its output
  to a log file (or stderr), stopped on the way out (SIGTERM, then SIGKILL; or SIGKILL at once).
- `RedisProcess`: a real redis-server on a loopback port that can be stopped and started again on that port,
  with a password or TLS when asked.
- `start_worker(...)`: a real `celery worker` process in its own session (so killing its group stops its pool
  processes too), returned once its pool processes have loaded their models.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(
    address: str,
    timeout: float,
    proc: subprocess.Popen[Any] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Until the server's health check says SERVING (over TLS with `credentials`)."""
    deadline = time.monotonic() + timeout
    channel = (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before serving")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} was not SERVING within {timeout:.0f}s")


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any SIEVE_* variable, plus `settings` (full variable names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(settings)
    return env


@dataclass
class SieveProcess:
    """A running `sieve serve` / `sieve run` child."""

    address: str
    proc: subprocess.Popen[bytes]
    log: Path | None
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""


@contextlib.contextmanager
def sieve_process(
    command: str = "serve",
    *,
    data_dir: Path,
    settings: dict[str, str] | None = None,
    log: Path | None = None,
    models_dir: Path | None = None,
    timeout_s: float = 120,
    stop: str = "term",
    inherit_env: bool = False,
    unset: tuple[str, ...] = (),
) -> Iterator[SieveProcess]:
    """`sieve <command>` on a free loopback port, yielded once SERVING; stopped on exit.

    `settings` are SIEVE_* variables (full names) on top of the data directory, address, models directory,
    no metrics endpoint (no clash on the default port) and INFO logs. `log`: the child's output, appended;
    None sends it to stderr. `stop`: "term" (graceful: SIGTERM, SIGKILL after 90 s) or "kill" (SIGKILL, for
    crash tests). `inherit_env`: keep the caller's own SIEVE_* variables (`sieve eval` passes its settings on);
    `unset`: variables to drop even so.
    """
    address = f"127.0.0.1:{free_port()}"
    base = dict(os.environ) if inherit_env else clean_env()
    base.update(
        SIEVE_DATA_DIR=str(data_dir),
        SIEVE_GRPC_ADDRESS=address,
        SIEVE_METRICS_ADDRESS="",
    )
    if not inherit_env:
        base.update(SIEVE_MODELS_DIR=str(models_dir or ROOT / "models"), SIEVE_LOG_LEVEL="INFO")
    base.update(settings or {})
    for name in unset:
        base.pop(name, None)
    out: IO[bytes] | IO[str] = log.open("ab") if log is not None else sys.stderr
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sieve_cli.main", command],
            env=base,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        if log is not None:
            out.close()
    running = SieveProcess(address, proc, log, base)
    try:
        try:
            wait_serving(address, timeout_s, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- sieve {command} log ---\n{running.log_tail()}") from None
        yield running
    finally:
        _stop(proc, graceful=stop == "term")


def _stop(proc: subprocess.Popen[bytes], *, graceful: bool) -> None:
    if proc.poll() is None:
        if graceful:
            proc.send_signal(signal.SIGTERM)  # `sieve run` stops server, workers, then Redis
            try:
                proc.wait(90)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    proc.wait(30)


@dataclass
class RedisTls:
    """PEM files for a redis-server that speaks only TLS."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None  # given: the server requires clients to present a cert (mTLS)
    client_key: Path | None = None


class RedisUnavailable(RuntimeError):
    """No redis-server binary on this machine."""


class RedisProcess:
    """A real redis-server on a loopback port, which can be stopped and started again on that port.

    With `password` it requires AUTH (the password is in `url`); with `tls` it listens only for TLS on
    that port (`url` is rediss://)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        tls: RedisTls | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable("redis-server is not installed (scripts/ensure_redis.sh installs it)")
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.args = args  # more redis-server options, e.g. ("--replicaof", HOST, PORT)
        auth = f":{password}@" if password else ""
        self.url = f"{'rediss' if tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A client that passes this server's password and TLS checks."""
        kwargs: dict[str, Any] = {"password": self.password}
        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
            if self.tls.client_cert is not None:
                kwargs.update(ssl_certfile=str(self.tls.client_cert), ssl_keyfile=str(self.tls.client_key))
        return redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1, **kwargs)

    def start(self) -> None:
        argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls is not None:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert)]
            argv += ["--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca)]
            argv += ["--tls-auth-clients", "yes" if self.tls.client_cert else "no"]
        argv += self.args
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit code {self.proc.poll()})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class WorkerProcess:
    """A running `celery worker` (its own session: killing the group stops its pool processes too)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def pool_pids(self) -> list[int]:
        """The pool (child) processes that run the tasks."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()


def start_worker(
    redis_url: str,
    log: Path,
    *,
    queues: str = "embed,colbert",
    concurrency: int = 1,
    models_dir: Path | None = None,
    settings: dict[str, str] | None = None,
    name: str = "sieve",
    timeout_s: float = 120,
    ping_app: Any = None,
) -> WorkerProcess:
    """A real `celery worker` on `queues`, returned once each pool process has loaded its models (and,
    given `ping_app`, a Celery app on the same broker, once the worker answers a control ping: its
    consumer is connected, so a task sent now is taken at once)."""
    env = clean_env(
        SIEVE_REDIS_URL=redis_url,
        SIEVE_MODELS_DIR=str(models_dir or ROOT / "models"),
        OPENBLAS_NUM_THREADS="1",  # as `sieve run` starts its workers
    )
    env.update(settings or {})
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues]
    argv += ["-c", str(concurrency), "-P", "prefork", "--loglevel", "INFO"]
    argv += ["-n", f"{name}-{os.getpid()}-{free_port()}@%h"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = WorkerProcess(proc, log)
    deadline = time.monotonic() + timeout_s
    try:
        while ping_app is not None and not ping_app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not answer ping (exit {proc.poll()}):\n{running.tail()}")
        # "warm in" is logged by each pool process once its runners are loaded (workers/runtime.py).
        while log.read_text(errors="replace").count("warm in") < concurrency:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not load its models (exit {proc.poll()}):\n{running.tail()}")
            time.sleep(0.1)
    except BaseException:
        running.kill()
        raise
    return running
