"""Where the core's blocking work runs: a shared pool for reads and model work, one writer thread for writes.

A single writer thread makes the server the single writer of its collections (no locks around the store
and the index), and the event loop never blocks on ONNX, usearch or SQLite.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from threadpoolctl import threadpool_limits

from sieve_core.config import Settings
from sieve_core.errors import storage_error

log = logging.getLogger(__name__)


class Executors:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.pool = ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="sieve-work")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="sieve-write")
        # numpy's BLAS (MaxSim over stored token vectors, token pooling) runs in these threads, parallel
        # across requests, beside ONNX's own threads: one BLAS thread each. Multi-threaded OpenBLAS on a
        # busy 2-core machine took 32 ms (p90 50) for MaxSim over 100 candidates, one thread 2.9 ms.
        threadpool_limits(limits=1, user_api="blas")

    async def run(self, executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        # run_in_executor does not carry contextvars into the thread: copy them, so that the request id
        # reaches log lines written there and the tasks sent from there.
        call = partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def read(self, fn: Any, *args: Any) -> Any:
        """Run a read or model call in the shared pool."""
        return await self.run(self.pool, fn, *args)

    async def write(self, fn: Any, *args: Any) -> Any:
        """Run a write on the writer thread. A full or read-only data directory becomes a clear error
        (RESOURCE_EXHAUSTED / FAILED_PRECONDITION, see sieve_core.errors.storage_error), not INTERNAL."""
        return await self.run(self.writer, self._storage_guarded, fn, *args)

    def _storage_guarded(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (OSError, sqlite3.Error) as exc:
            mapped = storage_error(exc, self._settings.data_dir)
            if mapped is None:
                raise
            log.warning("write refused: %s", mapped.message)
            raise mapped from exc

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self.writer.shutdown(wait=True)
