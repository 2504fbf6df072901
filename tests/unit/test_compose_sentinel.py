"""docker-compose.sentinel.yml (Docker cannot run here): its Sieve settings are real and fit together, every
service of the base file that talks to Redis is pointed at the Sentinels, and the Redis options and the
Sentinel configuration it uses are accepted by the local redis-server (started with them, hosts and ports
swapped for loopback ones)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from sieve_cli.stack import free_port
from sieve_core.config import Settings, load_settings, sentinel_addresses
from tests.conftest import ROOT

yaml = pytest.importorskip("yaml")

FILE = "docker-compose.sentinel.yml"


def _services(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())["services"]  # type: ignore[no-any-return]


def _monitor(service: dict[str, Any]) -> list[str]:
    """The `sentinel monitor NAME HOST PORT QUORUM` line of a Sentinel service's configuration."""
    found = re.search(r"'sentinel monitor ([^']+)'", service["command"][-1])
    assert found, "no `sentinel monitor` line"
    return found.group(1).split()


def test_settings_are_real_and_name_the_monitored_primary_and_the_sentinels() -> None:
    services = _services(FILE)
    sentinels = {name: s for name, s in services.items() if name.startswith("sentinel-")}
    assert len(sentinels) == 3
    base = _services("docker-compose.yml")
    uses_redis = {n for n, s in base.items() if "SIEVE_REDIS_URL" in s.get("environment", {})}
    assert uses_redis == {"server", "worker-embed", "worker-colbert", "flower"}
    for name in uses_redis:
        env = services[name]["environment"]
        for key in env:
            assert key[len("SIEVE_") :].lower() in Settings.model_fields, key
        settings = load_settings(env)  # validates the URL against the Sentinel list
        url = settings.redis_url.get_secret_value() if settings.redis_url else ""
        master = url.split("//", 1)[1].split("/", 1)[0]
        for sentinel in sentinels.values():
            assert _monitor(sentinel)[:3] == [master, "redis", "6379"]  # the base file's redis service
        assert {host for host, _ in sentinel_addresses(settings.redis_sentinels)} == set(sentinels)
        assert {port for _, port in sentinel_addresses(settings.redis_sentinels)} == {26379}
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    for service in services.values():
        assert "ports" not in service, "Redis and the Sentinels stay unpublished"


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/ensure_redis.sh installs it)")
    return binary


def _start(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[0].decode(errors="replace")
                raise AssertionError(f"{argv[0]} refused the compose options:\n{out[-2000:]}") from None
            time.sleep(0.05)


def test_the_redis_options_and_sentinel_configuration_work_with_this_redis_server(tmp_path: Path) -> None:
    binary = _redis_binary()
    services = _services(FILE)
    primary_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    loopback = {"redis": "127.0.0.1", "redis-replica": "127.0.0.1", "6379": str(primary_port)}
    started = []
    try:
        for name, port in (("redis", primary_port), ("redis-replica", replica_port)):
            argv = [loopback.get(arg, arg) for arg in services[name]["command"]]
            (tmp_path / name).mkdir()
            argv = [
                binary,
                *argv[1:],
                "--port",
                str(port),
                "--dir",
                str(tmp_path / name),
                "--bind",
                "127.0.0.1",
            ]
            started.append(_start(argv + ["--appendonly", "no"], port))
        replica = redis.Redis(port=replica_port, socket_timeout=1)
        assert replica.info("replication")["role"] == "slave"

        script = services["sentinel-1"]["command"][-1]
        script = script.replace("/data", str(tmp_path)).replace("port 26379", f"port {sentinel_port}")
        script = script.replace("sieve-primary redis 6379", f"sieve-primary 127.0.0.1 {primary_port}")
        script = script.replace("exec redis-server", f"exec {binary}")
        started.append(_start(["sh", "-c", script], sentinel_port))
        sentinel = redis.Redis(port=sentinel_port, socket_timeout=1)
        master: Any = sentinel.sentinel_master("sieve-primary")
        assert (master["port"], master["quorum"]) == (primary_port, 2)
        assert master["down-after-milliseconds"] == 5000
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
