"""docker-compose.servers.yml on top of docker-compose.yml and docker-compose.sentinel.yml (Docker cannot run
here): the three files merged as `docker compose -f ... -f ... -f ...` merges them (mappings key by key, the
rest replaced), then checked: two or more Sieve servers, every one on the `postgres` service's database (its
SIEVE_STORE_URL parsed by psycopg and compared with the image's POSTGRES_* variables), on the Sentinels with
REDIS_PASSWORD (for Redis and for the Sentinels), with its own data volume and its own published port, which
the clients' several-address support accepts as one target; the PostgreSQL image's variables are the
documented ones; the image installs psycopg."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sieve_core import redis_conn
from sieve_core.config import Settings, load_settings, sentinel_addresses
from tests.compose import load, raw
from tests.conftest import ROOT

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the `pg` extra)")

FILES = ("docker-compose.yml", "docker-compose.sentinel.yml", "docker-compose.servers.yml")
# The official image's variables (hub.docker.com/_/postgres, "Environment Variables"; the *_FILE forms read
# the value from a file instead).
POSTGRES_IMAGE_VARIABLES = {
    "POSTGRES_PASSWORD",
    "POSTGRES_USER",
    "POSTGRES_DB",
    "POSTGRES_INITDB_ARGS",
    "POSTGRES_INITDB_WALDIR",
    "POSTGRES_HOST_AUTH_METHOD",
    "PGDATA",
}
POSTGRES_IMAGE_VARIABLES |= {f"{v}_FILE" for v in ("POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB")}
# Values for compose's ${VAR...} interpolation, as an operator would set them.
ENV = {
    "POSTGRES_PASSWORD": "0123abcd",
    "REDIS_PASSWORD": "4567ef89",
    "SIEVE_API_KEYS": "k1:admin",
    "PUBLISH_HOST": "127.0.0.1",
    "FLOWER_BASIC_AUTH": "",
}


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    return load(*FILES, env=ENV)


def _servers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if s.get("command") == ["sieve", "serve"]}


def test_two_or_more_servers_on_the_postgres_service_database(merged: dict[str, Any]) -> None:
    services = merged["services"]
    postgres = services["postgres"]
    pg_env = postgres["environment"]
    servers = _servers(merged)
    assert len(servers) >= 2, sorted(servers)
    for name, server in servers.items():
        env = server["environment"]
        for key in env:
            assert key[len("SIEVE_") :].lower() in Settings.model_fields, f"{name}: {key}"
        settings = load_settings(env)
        assert settings.store_url is not None, f"{name} is not on PostgreSQL"
        url = psycopg.conninfo.conninfo_to_dict(settings.store_url.get_secret_value())
        assert url["host"] in services and services[url["host"]] is postgres, url
        assert (url["port"], url["dbname"]) == ("5432", pg_env["POSTGRES_DB"])
        assert (url["user"], url["password"]) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])
        assert server["depends_on"]["postgres"] == {"condition": "service_healthy"}, name
        # The broker and caches through the Sentinels of the Sentinel file.
        assert settings.redis_sentinels, f"{name} is not on the Sentinels"
        assert {h for h, _ in sentinel_addresses(settings.redis_sentinels)} <= set(services)
        # ... with the Sentinel file's password, for Redis and for the Sentinels themselves.
        assert urlsplit(redis_conn.redis_url(settings)).password == ENV["REDIS_PASSWORD"], name
        sentinel_password = settings.redis_sentinel_password
        assert sentinel_password and sentinel_password.get_secret_value() == ENV["REDIS_PASSWORD"], name
        assert settings.grpc_address.endswith(":50051") and str(settings.data_dir) == "/data"
    healthcheck = postgres["healthcheck"]["test"]
    assert healthcheck[1] == "pg_isready"
    assert healthcheck[healthcheck.index("-U") + 1] == pg_env["POSTGRES_USER"]
    assert healthcheck[healthcheck.index("-d") + 1] == pg_env["POSTGRES_DB"]
    assert "ports" not in postgres, "PostgreSQL stays unpublished"


def test_each_server_has_its_own_data_volume_and_published_port(merged: dict[str, Any]) -> None:
    servers = _servers(merged)
    volumes = [next(v for v in s["volumes"] if v.endswith(":/data")).split(":")[0] for s in servers.values()]
    # Index snapshots, upload spools and server-id are per server.
    assert len(set(volumes)) == len(servers), volumes
    assert set(volumes) <= set(merged["volumes"])
    grpc_ports = [next(p for p in s["ports"] if p.endswith(":50051")) for s in servers.values()]
    hosts = [p.rsplit(":", 1)[0] for p in grpc_ports]
    assert len(set(hosts)) == len(servers), hosts  # one host port each
    # The clients' several addresses reach them all: one round_robin target of every published port.
    from sieve._channel import target

    assert target(hosts) == (f"ipv4:{','.join(hosts)}", len(servers))


def test_the_postgres_image_and_its_variables_are_real(merged: dict[str, Any]) -> None:
    postgres = merged["services"]["postgres"]
    assert set(postgres["environment"]) <= POSTGRES_IMAGE_VARIABLES
    unset = raw("docker-compose.servers.yml")["services"]["postgres"]
    assert unset["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?"), "password required"
    assert "/var/lib/postgresql/data" in [v.split(":")[1] for v in postgres["volumes"]]  # the image's PGDATA
    image_major = re.fullmatch(r"postgres:(\d+)(?:[.-].*)?", postgres["image"])
    assert image_major, postgres["image"]
    installed = [Path(p).parent.name for p in glob.glob("/usr/lib/postgresql/*/bin")]
    if installed:  # the major version the tests here run against
        assert image_major.group(1) in installed, (postgres["image"], installed)
    # The image the servers run installs psycopg (the `pg` extra), or SIEVE_STORE_URL fails at start.
    docker = (ROOT / "Dockerfile").read_text()
    # The last stage is the runtime image (the first exports the model and is thrown away).
    runtime = docker.rsplit("\nFROM ", 1)[1]
    extras = re.search(r'pip install --no-cache-dir \./clients/python "\.\[([\w,]+)\]"', runtime)
    assert extras and "pg" in extras.group(1).split(","), "the runtime image lacks the `pg` extra"
