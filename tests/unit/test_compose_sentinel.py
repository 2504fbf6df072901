"""docker-compose.sentinel.yml (Docker cannot run here), alone and with what is added to it (the cross-encoder
files, the servers file), merged and interpolated as compose does (tests/compose.py):

- every Sieve service (each one with SIEVE_REDIS_URL) names the monitored primary with REDIS_PASSWORD, lists
  the Sentinel services and has their password; compose refuses to start without REDIS_PASSWORD;
- the local redis-server runs the primary's and the replica's options and the Sentinels' start-up script
  (hosts and ports swapped for loopback ones, the password from the service's environment): Redis and the
  Sentinel require the password, the replica replicates with it, the Sentinel reaches Redis with it, and
  each health check passes with its service's environment and fails without the password;
- Sieve (sieve_core/redis_conn.py, and Flower's broker client built as Flower builds it) connects through
  that Sentinel with the compose settings, and not without either password;
- after SENTINEL FAILOVER the old primary replicates from the new one (its --masterauth), and a Sentinel
  restarted with a new password keeps its state and takes the new password."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sieve_cli.stack import free_port
from sieve_core import redis_conn
from sieve_core.config import Settings, load_settings, sentinel_addresses
from sieve_core.tasking import client_app
from tests.compose import MissingVariable, load
from tests.conftest import ROOT

PASSWORD = secrets.token_hex(24)  # as `openssl rand -hex 24` makes it
ENV = {  # compose's variables, as an operator would set them
    "REDIS_PASSWORD": PASSWORD,
    "SIEVE_API_KEYS": "k1:admin",
    "PUBLISH_HOST": "127.0.0.1",
    "FLOWER_BASIC_AUTH": "",
    "SIEVE_CROSS_ENCODER_MODEL": "ce",
    "POSTGRES_PASSWORD": "0123abcd",
}
BASE = ("docker-compose.yml", "docker-compose.sentinel.yml")
STACKS = {  # the `-f` lists the headers of the compose files give
    "sentinel": BASE,
    "cross-encoder": (*BASE, "docker-compose.cross-encoder.yml", "docker-compose.cross-encoder.sentinel.yml"),
    "servers": (*BASE, "docker-compose.servers.yml"),
}
SIEVE_SERVICES = {
    "sentinel": {"server", "worker-embed", "worker-colbert", "flower"},
    "cross-encoder": {"server", "worker-embed", "worker-colbert", "flower", "worker-cross-encoder"},
    "servers": {"server", "worker-embed", "worker-colbert", "flower", "server-2"},
}
SWITCH_BUDGET_S = 30.0
# The test's own clients: an AUTH error at once, not after redis-py's retries.
NO_RETRY = Retry(NoBackoff(), 0)


@functools.cache
def _services() -> dict[str, Any]:
    return load(*STACKS["sentinel"], env=ENV)["services"]  # type: ignore[no-any-return]


def _monitor(service: dict[str, Any]) -> list[str]:
    """The `sentinel monitor NAME HOST PORT QUORUM` line of a Sentinel service's configuration."""
    found = re.search(r"'sentinel monitor ([^']+)'", service["command"][-1])
    assert found, "no `sentinel monitor` line"
    return found.group(1).split()


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv[:3]}..."
    return argv[argv.index(name) + 1]


def _sieve_settings(env: dict[str, str]) -> Settings:
    for key in env:
        assert key[len("SIEVE_") :].lower() in Settings.model_fields, key
    return load_settings(env)


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_every_sieve_service_has_the_password_and_the_sentinels(stack: str) -> None:
    services = load(*STACKS[stack], env=ENV)["services"]
    sentinels = {name: s for name, s in services.items() if name.startswith("sentinel-")}
    assert len(sentinels) == 3
    on_redis = {n for n, s in services.items() if "SIEVE_REDIS_URL" in s.get("environment", {})}
    assert on_redis == SIEVE_SERVICES[stack]
    for name in on_redis:
        env = {k: v for k, v in services[name]["environment"].items() if k.startswith("SIEVE_")}
        settings = _sieve_settings(env)  # validates the URL against the Sentinel list
        assert urlsplit(redis_conn.redis_url(settings)).password == PASSWORD, (
            f"{name}: no password in the URL"
        )
        sentinel_password = settings.redis_sentinel_password
        assert sentinel_password and sentinel_password.get_secret_value() == PASSWORD, name
        for sentinel in sentinels.values():
            assert _monitor(sentinel)[:3] == [redis_conn.master_name(settings), "redis", "6379"]
        addresses = sentinel_addresses(settings.redis_sentinels)
        assert {host for host, _ in addresses} == set(sentinels), name
        assert {port for _, port in addresses} == {26379}, name
        assert services[name]["depends_on"]["sentinel-1"] == {"condition": "service_healthy"}, name
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    for name in ("redis", "redis-replica"):  # either may be the primary after a failover
        command = services[name]["command"]
        assert _option(command, "--requirepass") == _option(command, "--masterauth") == PASSWORD, name
    for name in ("redis", "redis-replica", *sentinels):
        assert services[name]["environment"]["REDISCLI_AUTH"] == PASSWORD, f"{name}: health check without it"
        assert "ports" not in services[name], "Redis and the Sentinels stay unpublished"


@pytest.mark.parametrize("stack", sorted(STACKS))
@pytest.mark.parametrize("value", [None, ""])
def test_compose_refuses_to_start_without_redis_password(stack: str, value: str | None) -> None:
    env = {k: v for k, v in ENV.items() if k != "REDIS_PASSWORD"}
    if value is not None:
        env["REDIS_PASSWORD"] = value
    with pytest.raises(MissingVariable, match=r"REDIS_PASSWORD .*URL-safe, e\.g\. openssl rand -hex 24"):
        load(*STACKS[stack], env=env)


def test_every_use_of_redis_password_requires_it() -> None:
    """No `${REDIS_PASSWORD}` or `${REDIS_PASSWORD:-...}` that would quietly give an empty password."""
    uses = 0
    for name in sorted(p.name for p in ROOT.glob("docker-compose*.yml")):
        for form in re.findall(r"\$\{REDIS_PASSWORD([^}]*)\}", (ROOT / name).read_text()):
            uses += 1
            assert form.startswith(":?"), f"{name}: ${{REDIS_PASSWORD{form}}}"
    assert uses >= 8


# --- the options and the scripts, run by the local redis-server ---


@dataclass
class Group:
    """A primary, a replica and one Sentinel started from the compose file's options, on loopback ports."""

    binary: str
    directory: Path
    ports: dict[str, int]  # service name -> loopback port
    procs: dict[str, subprocess.Popen[bytes]]

    def client(self, name: str, password: str | None = PASSWORD) -> redis.Redis:
        return redis.Redis(
            port=self.ports[name],
            password=password,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=NO_RETRY,
        )

    def sentinel_script(self) -> str:
        script = str(_services()["sentinel-1"]["command"][-1])
        swaps = {
            "/data": str(self.directory / "sentinel-1"),
            "port 26379": f"port {self.ports['sentinel-1']}",
            "sieve-primary redis 6379": f"sieve-primary 127.0.0.1 {self.ports['redis']}",
            "exec redis-server": f"exec {self.binary}",
        }
        for old, new in swaps.items():
            assert old in script, old
            script = script.replace(old, new)
        return script + " --bind 127.0.0.1"

    def start_sentinel(self, password: str) -> None:
        env = {
            "PATH": os.environ["PATH"],
            **_services()["sentinel-1"]["environment"],
            "REDISCLI_AUTH": password,
        }
        argv = ["sh", "-c", self.sentinel_script()]
        log = self.directory / "sentinel-1.log"
        self.procs["sentinel-1"] = _start(argv, self.client("sentinel-1", password), log, env)

    def sieve_env(self, service: str = "server") -> dict[str, str]:
        """The service's Sieve settings, with the Sentinel's loopback address."""
        env = {k: v for k, v in _services()[service]["environment"].items() if k.startswith("SIEVE_")}
        return env | {"SIEVE_REDIS_SENTINELS": f"127.0.0.1:{self.ports['sentinel-1']}"}


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/ensure_redis.sh installs it)")
    return binary


def _start(
    argv: list[str], client: redis.Redis, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    # A file, not a pipe nobody reads: a replica's retries fill a pipe and block the replica.
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.RedisError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                tail = log.read_text(errors="replace")[-2000:]
                raise AssertionError(f"{argv[:3]} refused the compose options ({exc}):\n{tail}") from None
            time.sleep(0.05)


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f}s: {what}"
        time.sleep(0.1)


@contextmanager
def _group(directory: Path) -> Iterator[Group]:
    names = ("redis", "redis-replica", "sentinel-1")
    group = Group(_redis_binary(), directory, {name: free_port() for name in names}, {})
    loopback = {"redis": "127.0.0.1", "redis-replica": "127.0.0.1", "6379": str(group.ports["redis"])}
    try:
        for name in ("redis", "redis-replica"):
            argv = [loopback.get(arg, arg) for arg in _services()[name]["command"]]
            assert argv[0] == "redis-server"
            (directory / name).mkdir()
            where = ["--port", str(group.ports[name]), "--dir", str(directory / name), "--bind", "127.0.0.1"]
            # Test speed only: no AOF, and a full sync starts at once (the default waits 5 s for more replicas).
            argv = [group.binary, *argv[1:], *where, "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
            group.procs[name] = _start(argv, group.client(name), directory / f"{name}.log")
        (directory / "sentinel-1").mkdir()
        group.start_sentinel(PASSWORD)
        yield group
    finally:
        for proc in group.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    with _group(tmp_path_factory.mktemp("compose-sentinel")) as running:
        yield running


def _linked_to(group: Group, replica: str, primary: str) -> bool:
    info = group.client(replica).info("replication")
    return bool(
        info["role"] == "slave"
        and info["master_port"] == group.ports[primary]
        and info["master_link_status"] == "up"
    )


def test_redis_requires_the_password_and_the_replica_replicates_with_it(group: Group) -> None:
    for name in ("redis", "redis-replica"):
        with pytest.raises(redis.AuthenticationError):
            group.client(name, password=None).ping()
        with pytest.raises(redis.AuthenticationError):
            group.client(name, password="wrong").ping()
    _wait("the replica in sync with the primary", lambda: _linked_to(group, "redis-replica", "redis"))
    group.client("redis").set("replicated", "yes")
    _wait("a write replicated", lambda: group.client("redis-replica").get("replicated") == b"yes")


def _health(group: Group, name: str, env: dict[str, str]) -> int:
    test = _services()[name]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL", test
    command, port = test[1], str(group.ports[name])
    if "-p 26379" in command:  # the Sentinels'
        command = command.replace("-p 26379", f"-p {port}")
    else:  # Redis's: the default port
        command = command.replace("redis-cli", f"redis-cli -p {port}", 1)
    return subprocess.run(
        ["sh", "-c", command], env={"PATH": os.environ["PATH"], **env}, timeout=10
    ).returncode


def test_the_health_checks_authenticate(group: Group) -> None:
    for name in ("redis", "redis-replica", "sentinel-1"):
        env = _services()[name]["environment"]
        assert _health(group, name, env) == 0, f"{name}: unhealthy with its own environment"
        without = {k: v for k, v in env.items() if k != "REDISCLI_AUTH"}
        assert _health(group, name, without) != 0, f"{name}: healthy without the password"
        assert _health(group, name, {**env, "REDISCLI_AUTH": "wrong"}) != 0, (
            f"{name}: healthy, wrong password"
        )


HELLO = "__sentinel__:hello"  # the channel each Sentinel subscribes to on every Redis it monitors


def _hello_subscribers(group: Group, name: str, password: str = PASSWORD) -> int:
    """Sentinels subscribed to `name`'s service: a subscription needs AUTH, so this counts the Sentinels that
    reach it with the password (Sentinel's own PING and INFO bookkeeping starts "fresh" without one)."""
    return int(group.client(name, password).pubsub_numsub(HELLO)[0][1])


def _sentinel_names(group: Group, name: str, password: str = PASSWORD) -> bool:
    """The Sentinel names `name`'s service as the primary and reaches it with the password."""
    master: Any = group.client("sentinel-1", password).sentinel_master("sieve-primary")
    return bool(master["port"] == group.ports[name] and _hello_subscribers(group, name, password) == 1)


def _sentinel_knows_a_good_replica(group: Group) -> bool:
    """A replica the Sentinel could promote: its INFO (which needs AUTH) says it is in sync."""
    replicas: Any = group.client("sentinel-1").sentinel_slaves("sieve-primary")
    return any(
        r["port"] == group.ports["redis-replica"]
        and r["flags"] == "slave"
        and r["master-link-status"] == "ok"
        for r in replicas
    )


def test_the_sentinel_requires_the_password_and_reaches_redis_with_it(group: Group) -> None:
    with pytest.raises(redis.AuthenticationError):
        group.client("sentinel-1", password=None).ping()
    _wait("the Sentinel reaching the primary", lambda: _sentinel_names(group, "redis"))
    _wait("the Sentinel reaching the replica", lambda: _sentinel_knows_a_good_replica(group))
    master: Any = group.client("sentinel-1").sentinel_master("sieve-primary")
    # It found the replica in the primary's INFO (its configuration named none).
    assert (master["num-slaves"], master["quorum"], master["down-after-milliseconds"]) == (1, 2, 5000)


def test_sieve_and_flower_connect_through_the_sentinel_with_both_passwords_only(group: Group) -> None:
    from flower.utils.broker import Broker

    settings = _sieve_settings(group.sieve_env())
    client = redis_conn.client(settings, timeout_s=2)
    client.set("through-sentinel", "ok")
    assert group.client("redis").get("through-sentinel") == b"ok"  # on the primary the Sentinel names
    without_url_password = group.sieve_env() | {"SIEVE_REDIS_URL": "redis://sieve-primary/0"}
    with pytest.raises(redis.AuthenticationError):
        redis_conn.client(_sieve_settings(without_url_password), timeout_s=2).ping()
    without_sentinel_password = group.sieve_env()
    del without_sentinel_password["SIEVE_REDIS_SENTINEL_PASSWORD"]
    with pytest.raises(redis.ConnectionError):  # redis-py: MasterNotFoundError, the Sentinel said NOAUTH
        redis_conn.client(_sieve_settings(without_sentinel_password), timeout_s=2).ping()

    # Flower (`celery -A workers.celery_app flower`) takes the app's broker: the Sentinel file's settings.
    app = client_app(_sieve_settings(group.sieve_env("flower")))
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("embed")
        queue.put({"from": "compose test"})
        queue.close()
    with app.connection() as conn:
        uri = conn.as_uri(include_password=True)
    broker = Broker(
        uri, broker_options=app.conf.broker_transport_options, broker_use_ssl=app.conf.broker_use_ssl
    )
    assert asyncio.run(broker.queues(["embed"])) == [{"name": "embed", "messages": 1}]


def test_failover_then_a_new_password_at_the_next_start(tmp_path: Path) -> None:
    with _group(tmp_path) as group:
        _wait("the Sentinel reaching the replica", lambda: _sentinel_knows_a_good_replica(group))
        group.client("sentinel-1").sentinel_failover("sieve-primary")
        _wait("the Sentinel naming the promoted replica", lambda: _sentinel_names(group, "redis-replica"))
        # The old primary replicates from the new one with its --masterauth. The Sentinels send it this
        # REPLICAOF themselves, but only once it has reported the wrong role for 8 s; sent here at once.
        group.client("redis").replicaof("127.0.0.1", group.ports["redis-replica"])
        _wait("the old primary in sync with the new one", lambda: _linked_to(group, "redis", "redis-replica"))
        redis_conn.client(_sieve_settings(group.sieve_env()), timeout_s=2).set("after-failover", "ok")
        assert group.client("redis-replica").get("after-failover") == b"ok"
        _wait("the write replicated back", lambda: group.client("redis").get("after-failover") == b"ok")

        # A new REDIS_PASSWORD: Redis gets it on its command line at its next start (here: CONFIG SET), the
        # Sentinel from its environment, over the configuration file it kept (which names the new primary).
        new = secrets.token_hex(24)
        for name in ("redis", "redis-replica"):
            group.client(name).config_set("masterauth", new)
            group.client(name).config_set("requirepass", new)
        group.procs["sentinel-1"].kill()
        group.procs["sentinel-1"].wait()
        _wait(
            "the old Sentinel's subscription gone",
            lambda: _hello_subscribers(group, "redis-replica", new) == 0,
        )
        group.start_sentinel(new)
        with pytest.raises(redis.AuthenticationError):
            group.client("sentinel-1", PASSWORD).ping()
        _wait(
            "the restarted Sentinel reaching the new primary with the new password",
            lambda: _sentinel_names(group, "redis-replica", new),
        )
        env = group.sieve_env() | {
            "SIEVE_REDIS_URL": f"redis://:{new}@sieve-primary/0",
            "SIEVE_REDIS_SENTINEL_PASSWORD": new,
        }
        assert redis_conn.client(_sieve_settings(env), timeout_s=2).get("after-failover") == b"ok"
