"""The PostgreSQL test harness (sieve_cli/pg_cluster.py): a real cluster from the machine's packages."""

from __future__ import annotations

import psycopg
import pytest

from sieve_cli.pg_cluster import PostgresCluster


def test_each_database_is_empty_and_durable_by_default(postgres: PostgresCluster, pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE t (x INT)")
        settings = conn.execute(
            "SELECT current_setting('synchronous_commit'), current_setting('fsync')"
        ).fetchone()
        assert settings == ("on", "on")  # the harness does not weaken what a COMMIT means
    # Another test's database does not see this one's tables.
    with psycopg.connect(postgres.new_database()) as conn:
        assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)


def test_a_stopped_cluster_refuses_connections_and_keeps_its_data_when_started_again(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with PostgresCluster() as cluster:
        url = cluster.new_database()
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE t (x INT)")
            conn.execute("INSERT INTO t VALUES (7)")
        cluster.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        cluster.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]
    assert not cluster.directory.exists()
