"""A throw-away PostgreSQL cluster from the machine's packages, for the tests and the benchmarks.

`PostgresCluster(directory)` runs `initdb` and `pg_ctl` (found on PATH or under /usr/lib/postgresql/*/bin) on a
data directory of its own, listening only on a unix socket in that directory (no TCP port to clash with other
runs), with trust authentication for the `postgres` role. PostgreSQL refuses to run as root, so when this
process is root the commands run as the `postgres` user (`runuser -u postgres --`) and the directory is
handed to it. `new_database()` makes an empty database and returns its `postgresql://` URL.

`initdb --no-sync` (the empty cluster's files are not flushed at creation: seconds saved per run); after
that the durability settings are PostgreSQL's defaults (fsync and synchronous_commit on): the tests that kill Sieve
mid-write check what PostgreSQL acknowledged, and a cluster that skipped fsync would only change what a
power cut keeps, not what a killed Sieve process keeps.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine, or no way to run them."""


def _binaries() -> tuple[str, str]:
    for folder in [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb, pg_ctl = shutil.which("initdb", path=folder), shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    raise PostgresUnavailable(
        "PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin): "
        "apt-get install postgresql"
    )


class PostgresCluster:
    """A PostgreSQL server on a unix socket in `directory` (made if missing), started and stopped by us."""

    def __init__(self, directory: Path | None = None) -> None:
        self.initdb, self.pg_ctl = _binaries()
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailable(
                    "running as root without runuser: cannot start PostgreSQL as postgres"
                )
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no `postgres` user") from None
            self._as_postgres = [runuser, "-u", "postgres", "--"]
        # A short path: the socket's full name must fit in 107 bytes.
        self.directory = directory or Path(tempfile.mkdtemp(prefix="sieve-pg-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = 5432  # names the socket file only (no TCP listener)
        self.user = "postgres"
        self.running = False

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as_postgres, *argv], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stderr.strip()}\n{tail}")

    def start(self) -> None:
        if self._as_postgres:
            shutil.chown(self.directory, user="postgres", group="postgres")
            self.directory.chmod(0o700)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                self.initdb, "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"
            )
        options = f"-k {self.directory} -c listen_addresses='' -p {self.port}"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{database}?host={self.directory}&port={self.port}"

    def new_database(self, name: str | None = None) -> str:
        """An empty database on this cluster; its URL."""
        import psycopg

        name = name or f"sieve_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()
