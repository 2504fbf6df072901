"""Shared fixtures: a real in-process gRPC server on port 0, with the real ONNX bi-encoder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis
from sieve.v1 import collections_pb2_grpc, documents_pb2_grpc, search_pb2_grpc

from server.app import SieveServer
from sieve_cli.evaluate import free_port
from sieve_core.config import Settings, load_settings
from sieve_core.tasking import QUEUE_COLBERT, QUEUE_EMBED, SieveCelery
from workers.celery_app import create_app

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
MODEL = "all-MiniLM-L6-v2"
SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"


LAYERS = ("unit", "grpc", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its layer, the folder it lives in (tests/unit, tests/grpc, ...)."""
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


def require_bundle() -> None:
    if not (MODELS_DIR / MODEL / "manifest.json").is_file():
        pytest.fail(f"model bundle {MODELS_DIR / MODEL} is missing: run `make models` (make test does)")


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "models_dir": MODELS_DIR,
        "grpc_address": "127.0.0.1:0",
        "metrics_address": "",  # tests that want the endpoint ask for 127.0.0.1:0
        **overrides,
    }
    return load_settings({}, data_dir=data_dir, **values)


@dataclass
class Api:
    address: str
    channel: grpc.aio.Channel
    collections: collections_pb2_grpc.CollectionServiceStub
    documents: documents_pb2_grpc.DocumentServiceStub
    search: search_pb2_grpc.SearchServiceStub
    server: SieveServer


async def start_api(settings: Settings) -> Api:
    require_bundle()
    server = SieveServer(settings)
    await server.start()
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address)
    return Api(
        address,
        channel,
        collections_pb2_grpc.CollectionServiceStub(channel),
        documents_pb2_grpc.DocumentServiceStub(channel),
        search_pb2_grpc.SearchServiceStub(channel),
        server,
    )


async def stop_api(api: Api) -> None:
    await api.channel.close()
    await api.server.stop(grace=1)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """One server for the session; tests use their own collection names."""
    running = await start_api(make_settings(tmp_path_factory.mktemp("sieve-data"), max_batch_documents=500))
    yield running
    await stop_api(running)


# -- a real redis-server and a real Celery worker (module-scoped, for worker and cascade tests) ----


@dataclass
class RedisTls:
    """PEM files for a redis-server that speaks only TLS (tests/integration/test_redis_security.py makes them)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None  # given: the server requires clients to present a cert (mTLS)
    client_key: Path | None = None


class RedisServer:
    """A real redis-server on a loopback port, which a test can stop and start again on that port.

    With `password` it requires AUTH (the password is in `url`); with `tls` it listens only for TLS on
    that port (`url` is rediss://)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (make test installs it via scripts/ensure_redis.sh)")
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        auth = f":{password}@" if password else ""
        self.url = f"{'rediss' if tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A client that passes this server's password and TLS checks."""
        kwargs: dict[str, object] = {"password": self.password}
        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
            if self.tls.client_cert is not None:
                kwargs.update(ssl_certfile=str(self.tls.client_cert), ssl_keyfile=str(self.tls.client_key))
        return redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls is not None:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert)]
            argv += ["--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca)]
            argv += ["--tls-auth-clients", "yes" if self.tls.client_cert else "no"]
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


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="module")
def client_app(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> SieveCelery:
    return create_app(make_settings(tmp_path_factory.mktemp("client"), redis_url=redis_url))


class Worker:
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
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and its pool processes (own session)
        self.proc.wait()


def start_worker(
    redis_url: str,
    client_app: SieveCelery,
    log: Path,
    *,
    queues: str = f"{QUEUE_EMBED},{QUEUE_COLBERT}",
    models_dir: Path = MODELS_DIR,
    extra_env: dict[str, str] | None = None,
    name: str = "test",
) -> Worker:
    """A real `celery worker` process (its own session, so killpg stops its pool too), ready to work."""
    require_bundle()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(
        SIEVE_REDIS_URL=redis_url, SIEVE_MODELS_DIR=str(models_dir), SIEVE_DEFAULT_EMBEDDING_MODEL=MODEL
    )
    env["OPENBLAS_NUM_THREADS"] = "1"  # as `sieve run` starts its workers
    env.update(extra_env or {})
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"]
    argv += ["-Q", queues, "-c", "1", "-P", "prefork", "--loglevel", "INFO"]
    argv += ["-n", f"{name}-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Worker(proc, log)
    deadline = time.monotonic() + 60
    try:
        while not client_app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not answer ping (exit code {proc.poll()}):\n{running.tail()}")
        # Ping answers from the parent; wait for the pool process to have loaded its models too.
        while "warm in" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not load its model:\n{running.tail()}")
            time.sleep(0.1)
    except BaseException:
        running.kill()
        raise
    return running


@pytest.fixture(scope="module")
def worker(
    redis_url: str, client_app: SieveCelery, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    running = start_worker(redis_url, client_app, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield running
    finally:
        running.kill()
