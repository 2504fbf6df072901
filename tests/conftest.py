"""Shared fixtures: a real in-process gRPC server on port 0, with the real ONNX bi-encoder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from sieve.v1 import collections_pb2_grpc, documents_pb2_grpc, search_pb2_grpc

from server.app import SieveServer
from sieve_core.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
MODEL = "all-MiniLM-L6-v2"
SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"


def require_bundle() -> None:
    if not (MODELS_DIR / MODEL / "manifest.json").is_file():
        pytest.fail(f"model bundle {MODELS_DIR / MODEL} is missing: run `make models` (make test does)")


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return load_settings(
        {}, data_dir=data_dir, models_dir=MODELS_DIR, grpc_address="127.0.0.1:0", **overrides
    )


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
