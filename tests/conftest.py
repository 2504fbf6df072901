"""Shared fixtures: a real in-process gRPC server on port 0, with the real ONNX bi-encoder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Imported now, not by its pytest plugin's terminal summary after the run: CPython 3.11.7's ast.parse can fail
# there with 'AST constructor recursion depth mismatch' once a test has caught a RecursionError (seen when
# only some test files ran), which turns a green run into an internal error.
import hypothesis  # noqa: F401
import pytest
import pytest_asyncio
from sieve.v1 import collections_pb2_grpc, documents_pb2_grpc, search_pb2_grpc

from server.app import SieveServer
from sieve_cli import stack
from sieve_cli.pg_cluster import PostgresCluster, PostgresUnavailable
from sieve_cli.stack import WorkerProcess as Worker
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


class RedisServer(stack.RedisProcess):
    """sieve_cli.stack.RedisProcess; a machine without redis-server skips the test instead of failing it."""

    def __init__(self, directory: Path, port: int | None = None, **kwargs: Any) -> None:
        try:
            super().__init__(directory, port, **kwargs)
        except stack.RedisUnavailable as exc:
            pytest.skip(str(exc))


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


# -- a real PostgreSQL cluster (session-scoped; each test that asks gets an empty database of its own) ----


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """sieve_cli.pg_cluster.PostgresCluster in a temporary folder; a machine without PostgreSQL or psycopg
    skips the test instead of failing it."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (make install installs the `pg` extra)")
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    with cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """The URL of an empty database on the session's cluster."""
    return postgres.new_database()


@pytest.fixture(scope="module")
def client_app(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> SieveCelery:
    return create_app(make_settings(tmp_path_factory.mktemp("client"), redis_url=redis_url))


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
    """A real `celery worker` process (sieve_cli.stack.start_worker), ready to work."""
    require_bundle()
    settings = {"SIEVE_DEFAULT_EMBEDDING_MODEL": MODEL, **(extra_env or {})}
    return stack.start_worker(
        redis_url,
        log,
        queues=queues,
        models_dir=models_dir,
        settings=settings,
        name=name,
        timeout_s=60,
        ping_app=client_app,
    )


@pytest.fixture(scope="module")
def worker(
    redis_url: str, client_app: SieveCelery, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    running = start_worker(redis_url, client_app, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield running
    finally:
        running.kill()


SEEDED_CROSS_ENCODER = "cross-seeded"


@pytest.fixture(scope="session")
def seeded_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the real bi-encoder and a cross-encoder exported from a seeded checkpoint of the
    real architecture (no trained cross-encoder is reachable here: speed and plumbing only, no quality).
    Exported once per test session, in a subprocess (this process never imports torch)."""
    require_bundle()
    from sieve_core.models.export import subprocess_env

    work = tmp_path_factory.mktemp("seeded-models")
    models = work / "models"
    models.mkdir()
    (models / MODEL).symlink_to(MODELS_DIR / MODEL)
    checkpoint = work / "cross-checkpoint"
    script = (
        f"{sys.executable} -m sieve_core.models.export_cross_encoder seed --out {checkpoint} && "
        f"{sys.executable} -m sieve_core.models.export cross-encoder --source {checkpoint} "
        f"--out {models / SEEDED_CROSS_ENCODER} --name {SEEDED_CROSS_ENCODER}"
    )
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace")[-3000:] + done.stderr.decode(
        errors="replace"
    )
    return models
