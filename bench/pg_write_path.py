"""Where a single-document write's time goes in the store layer, SQLite vs PostgreSQL (no server, no gRPC).

    .venv/bin/python bench/pg_write_path.py [--writes 300]

Why: bench/change_log_lag.py reached 85 of the 100 writes/s asked; a server commits its writes one at a time
(one writer thread, and the advisory lock across servers), so its write rate is 1 / (one write's time).
This times `Store.upsert` of one new document with a precomputed 384-d vector and one metadata pair, in
process, on an SQLite file and on a PostgreSQL database (a cluster started from the machine's packages,
sieve_cli/pg_cluster.py, unix socket, fsync and synchronous_commit on), the two interleaved write by write
(order alternating). For PostgreSQL it also times every statement the write sends (each one a round trip to
the database's backend process) by what it does. Result: bench/results/pg_write_path.json, with the load
average (the machine is shared: a round trip is a wake-up of another process, so on busy cores its mean is
far above its median).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from run import command_line, log, percentiles, write_result

from server.storage.postgres_db import PgConnection, PostgresStore
from server.storage.store import SqliteStore, Store
from sieve_cli.pg_cluster import PostgresCluster
from sieve_core.types import Document


def timed_statements(spent: dict[str, list[float]]) -> None:
    """Wraps PgConnection so that every statement's time is recorded under its first words."""
    execute, executemany = PgConnection.execute, PgConnection.executemany

    def timed(method: Any, label: str) -> Any:
        def run(self: PgConnection, sql: str, params: Any = (), /) -> Any:
            started = time.perf_counter()
            try:
                return method(self, sql, params)
            finally:
                spent[label + " ".join(sql.split()[:3])].append((time.perf_counter() - started) * 1000)

        return run

    PgConnection.execute = timed(execute, "")  # type: ignore[method-assign]
    PgConnection.executemany = timed(executemany, "executemany: ")  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writes", type=int, default=300, help="writes per store")
    args = parser.parse_args()
    started = time.monotonic()
    load_before = os.getloadavg()
    spent: dict[str, list[float]] = defaultdict(list)
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="sieve-writes-") as tmp, PostgresCluster() as cluster:
        stores: dict[str, Store] = {
            "sqlite": SqliteStore(Path(tmp) / "sieve.db"),
            "postgresql": PostgresStore(cluster.new_database()),
        }
        ids = {
            name: s.create_collection("c", "m", "m-id", "cosine", 384, "{}").id for name, s in stores.items()
        }
        timed_statements(spent)
        spent.clear()
        times: dict[str, list[float]] = {name: [] for name in stores}
        for i in range(args.writes):
            for name in list(stores) if i % 2 else list(reversed(stores)):
                doc = Document(f"d{i}", f"synthetic document {i}", {"kind": "synthetic"})
                vector = rng.standard_normal(384).astype(np.float32)
                begin = time.perf_counter()
                stores[name].upsert(ids[name], [doc], {doc.id: vector})
                times[name].append((time.perf_counter() - begin) * 1000)
    skip = 10  # the first writes warm connections and caches
    per_write = {
        name: {**percentiles(t[skip:]), "mean_ms": round(statistics.mean(t[skip:]), 3)}
        for name, t in times.items()
    }
    statements = {
        label: {
            "per_write": len(t) // args.writes,
            "p50_ms": round(statistics.median(t), 3),
            "mean_ms": round(statistics.mean(t), 3),
        }
        for label, t in spent.items()
    }
    for name, figures in per_write.items():
        log(f"{name}: one write p50 {figures['p50_ms']:.2f} ms, mean {figures['mean_ms']:.2f} ms")
    for label, figures in statements.items():
        log(
            f"  postgresql {label!r}: {figures['per_write']} per write, p50 {figures['p50_ms']:.2f} ms, mean {figures['mean_ms']:.2f} ms"
        )
    write_result(
        "pg_write_path",
        {
            "what": "Store.upsert of one new document (precomputed vector), in process, SQLite vs PostgreSQL "
            "interleaved; PostgreSQL's statements timed one by one",
            "writes": args.writes,
            "per_write": per_write,
            "postgresql_statements": statements,
            "load_average_before": [round(x, 2) for x in load_before],
        },
        command=command_line("bench/pg_write_path.py", sys.argv[1:]),
        quick=args.writes < 300,
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
