"""A Redis primary, one replica and three Sentinels on loopback ports (`redis-server CONF --sentinel`), for the
Sentinel tests and for trying a failover by hand; built on stack.RedisProcess.

`SentinelGroup.settings()` gives the SIEVE_REDIS_* variables a server or worker needs to use it; `primary_port()`
asks a Sentinel where the primary is now; `wait_for_primary_other_than(port)` waits out a failover.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from sieve_cli.stack import RedisProcess, RedisTls, RedisUnavailable, free_port

# Fast enough for a test to see a failover within seconds: a primary silent for 1 s is subjectively down,
# and two Sentinels agreeing make it objectively down and start the failover.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 10_000
QUORUM = 2


class SentinelProcess:
    """One `redis-server sentinel.conf --sentinel` (it rewrites its own config file, so each has its own)."""

    def __init__(
        self,
        directory: Path,
        master: str,
        primary_port: int,
        *,
        password: str | None,
        auth: str | None,
        tls: RedisTls | None = None,
    ):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable("redis-server is not installed (scripts/ensure_redis.sh installs it)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.password = auth
        self.tls = tls
        self.conf = directory / f"sentinel-{self.port}.conf"
        lines = [
            f"port {self.port}" if tls is None else f"port 0\ntls-port {self.port}",
            "bind 127.0.0.1",
            f"dir {directory}",
            f"sentinel monitor {master} 127.0.0.1 {primary_port} {QUORUM}",
            f"sentinel down-after-milliseconds {master} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {master} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {master} 1",
        ]
        if password:
            lines.append(f"sentinel auth-pass {master} {password}")  # the primary's and replicas' password
        if auth:
            lines.append(f"requirepass {auth}")  # the Sentinels' own (also used between Sentinels)
        if tls is not None:  # TLS only, to clients and (tls-replication) to the Redis servers and each other
            lines += [f"tls-cert-file {tls.cert}", f"tls-key-file {tls.key}", f"tls-ca-cert-file {tls.ca}"]
            lines += ["tls-replication yes", "tls-auth-clients no"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        tls: dict[str, Any] = {} if self.tls is None else {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=1, **tls
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_ping(self.client(), self.proc, "redis sentinel")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def _wait_ping(client: redis.Redis, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (exit code {proc.poll()})") from None
            time.sleep(0.05)


class SentinelGroup:
    """A primary, a replica of it and three Sentinels watching them under the name `master`.

    `password`: the primary's and the replica's (`requirepass`, and `masterauth` so either can replicate from
    the other after a failover); `sentinel_password`: the Sentinels' own `requirepass`; `tls`: every process
    speaks only TLS (replication and the Sentinels' connections included)."""

    def __init__(
        self,
        directory: Path,
        master: str = "sieve-primary",
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        sentinels: int = 3,
        tls: RedisTls | None = None,
    ) -> None:
        self.directory = directory
        self.master = master
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        common: tuple[str, ...] = ("--masterauth", password) if password else ()
        common += ("--tls-replication", "yes") if tls else ()
        self.primary = RedisProcess(self._dir("primary"), password=password, tls=tls, args=common)
        replica_of = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica = RedisProcess(
            self._dir("replica"), password=password, tls=tls, args=common + replica_of
        )
        self.sentinels = [
            SentinelProcess(
                self._dir(f"sentinel{i}"),
                master,
                self.primary.port,
                password=password,
                auth=sentinel_password,
                tls=tls,
            )
            for i in range(sentinels)
        ]

    def _dir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        """SIEVE_REDIS_URL in Sentinel mode: the master's name where the host would be."""
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.master}/0"

    def settings(self) -> dict[str, str]:
        """The SIEVE_* variables that point a server or worker at this group."""
        values = {
            "SIEVE_REDIS_URL": self.url,
            "SIEVE_REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
        }
        if self.sentinel_password:
            values["SIEVE_REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        if self.tls is not None:
            values["SIEVE_REDIS_TLS_CA_FILE"] = str(self.tls.ca)
        return values

    def node(self, port: int) -> RedisProcess:
        """The primary or the replica, by port."""
        return next(n for n in (self.primary, self.replica) if n.port == port)

    def primary_port(self) -> int | None:
        """Where the Sentinels say the primary is (the first that answers), None if none knows."""
        for sentinel in self.sentinels:
            try:
                address: Any = sentinel.client().sentinel_get_master_addr_by_name(self.master)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def start(self, timeout_s: float = 30) -> None:
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        # Ready for a failover once the replica is in sync and every Sentinel knows the replica and the
        # other Sentinels (they find each other through hello messages on the primary, every 2 s).
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinels did not see the replica and each other in time")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            if self.replica.client().info("replication").get("master_link_status") != "up":
                return False
            for sentinel in self.sentinels:
                state: Any = sentinel.client().sentinel_master(self.master)
                if (
                    state.get("num-slaves") != 1
                    or state.get("num-other-sentinels") != len(self.sentinels) - 1
                ):
                    return False
        except redis.RedisError:
            return False
        return True

    def wait_for_primary_other_than(self, port: int, timeout_s: float = 30) -> int:
        """Until the Sentinels name another primary (a failover has happened); its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = self.primary_port()
            if now is not None and now != port:
                return now
            time.sleep(0.1)
        raise TimeoutError(f"no failover away from port {port} within {timeout_s:.0f}s")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.primary.stop()
        self.replica.stop()

    def __enter__(self) -> SentinelGroup:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
