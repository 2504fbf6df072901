"""The asyncio client is generated from the blocking one (scripts/gen_async_client.py): aio.py and sieve/_async
must be what client.py and sieve/_sync generate, and the two clients offer the same methods (their own and
inherited from the per-service parts) with the same parameters."""

from __future__ import annotations

import inspect
import subprocess
import sys

import grpc
from sieve import AsyncSieveClient, SieveClient

from tests.conftest import ROOT


def test_aio_py_is_what_client_py_generates() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/gen_async_client.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_both_clients_have_the_same_methods_and_parameters() -> None:
    renamed = {"__enter__": "__aenter__", "__exit__": "__aexit__"}

    def methods(cls: type) -> dict[str, list[str]]:
        """Every method the client has from the sieve package (its parts included), with its parameters."""
        return {
            renamed.get(name, name): list(inspect.signature(fn).parameters)
            for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if fn.__module__.startswith("sieve.")
        }

    sync, aio = methods(SieveClient), methods(AsyncSieveClient)
    assert sync == aio
    assert {"search", "search_stream", "upsert_documents", "watch_job", "_unary", "_stream"} <= set(sync)
    coroutines = {n for n, fn in inspect.getmembers(AsyncSieveClient) if inspect.iscoroutinefunction(fn)}
    assert coroutines == set(aio) - {"__init__", "watch_job", "search_stream", "_stream"}
    for name in ("watch_job", "search_stream", "_stream"):
        assert inspect.isasyncgenfunction(getattr(AsyncSieveClient, name)), name


def test_the_async_client_catches_aio_errors() -> None:
    # The generated code catches grpc.RpcError, as the sync one does: grpc.aio's errors are RpcErrors.
    assert issubclass(grpc.aio.AioRpcError, grpc.RpcError)
