"""The asyncio client is generated from the blocking one (scripts/gen_async_client.py): aio.py must be what
client.py generates, and the two classes offer the same methods with the same parameters."""

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
        return {
            renamed.get(name, name): list(inspect.signature(fn).parameters)
            for name, fn in vars(cls).items()
            if inspect.isfunction(fn)
        }

    sync, aio = methods(SieveClient), methods(AsyncSieveClient)
    assert sync == aio
    coroutines = {n for n, fn in vars(AsyncSieveClient).items() if inspect.iscoroutinefunction(fn)}
    assert coroutines == set(aio) - {"__init__", "watch_job"}
    assert inspect.isasyncgenfunction(AsyncSieveClient.watch_job)


def test_the_async_client_catches_aio_errors() -> None:
    # The generated code catches grpc.RpcError, as the sync one does: grpc.aio's errors are RpcErrors.
    assert issubclass(grpc.aio.AioRpcError, grpc.RpcError)
