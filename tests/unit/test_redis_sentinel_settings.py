"""Sentinel mode of sieve_core.redis_conn and tasking: what the settings accept, and the options every client
gets from them (redis-py's Sentinel client; Celery's sentinel:// URLs and transport options). The real thing,
through a failover, is tests/integration/test_sentinel.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.sentinel import SentinelConnectionPool

from sieve_core import redis_conn
from sieve_core.config import load_settings
from sieve_core.tasking import VISIBILITY_TIMEOUT_S, celery_config

SENTINELS = "127.0.0.1:26379, 10.0.0.2:26380"


def test_the_url_names_the_primary_without_a_port_and_malformed_sentinels_are_refused() -> None:
    ok = load_settings({}, redis_url="redis://:pw@sieve-primary/2", redis_sentinels=SENTINELS)
    assert redis_conn.master_name(ok) == "sieve-primary"
    for url in ("redis://:pw@sieve-primary:6379/0", None):
        with pytest.raises(ValidationError, match="names the primary the Sentinels watch"):
            load_settings({}, redis_url=url, redis_sentinels=SENTINELS)
    for bad in ("127.0.0.1", "127.0.0.1:port", ":26379", "h:0"):
        with pytest.raises(ValidationError, match="expected host:port"):
            load_settings({}, redis_url="redis://m/0", redis_sentinels=bad)
    # The refusal never shows the URL (and so never its password).
    with pytest.raises(ValidationError) as refused:
        load_settings({}, redis_url="redis://:secret-pw@m:6379/0", redis_sentinels=SENTINELS)
    assert "secret-pw" not in str(refused.value)


def test_celery_gets_sentinel_urls_and_transport_options() -> None:
    settings = load_settings(
        {},
        redis_url="redis://:p%40ss@sieve-primary/2",
        redis_sentinels=SENTINELS,
        redis_sentinel_password="spw",
    )
    config = celery_config(settings)
    urls = "sentinel://:p%40ss@127.0.0.1:26379/2;sentinel://:p%40ss@10.0.0.2:26380/2"
    assert config["broker_url"] == config["result_backend"] == urls
    for key in ("broker_transport_options", "result_backend_transport_options"):
        options = config[key]
        assert options["master_name"] == "sieve-primary"
        assert options["visibility_timeout"] == VISIBILITY_TIMEOUT_S
        assert options["sentinel_kwargs"]["password"] == "spw"
        assert options["sentinel_kwargs"]["socket_timeout"] > 0  # none would hang on a lost Sentinel
    # Without Sentinels: the URL as it is, as before.
    plain = celery_config(load_settings({}, redis_url="redis://127.0.0.1:6379/0"))
    assert plain["broker_url"] == "redis://127.0.0.1:6379/0"
    assert plain["broker_transport_options"] == {"visibility_timeout": VISIBILITY_TIMEOUT_S}


def test_redis_py_clients_ask_the_sentinels_for_the_primary(tmp_path: Path) -> None:
    settings = load_settings(
        {},
        redis_url="redis://user:pw@sieve-primary/3",
        redis_sentinels=SENTINELS,
        redis_sentinel_password="spw",
    )
    client = redis_conn.client(settings, timeout_s=0.5)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "sieve-primary"
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"], kwargs["socket_timeout"]) == (
        "user",
        "pw",
        3,
        0.5,
    )
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    assert {s.connection_pool.connection_kwargs["password"] for s in sentinels} == {"spw"}
    # An explicit URL (the local Redis `sieve run` starts) is a direct connection, Sentinels or not.
    direct = redis_conn.client(settings, timeout_s=0.5, url="redis://127.0.0.1:6390/0")
    assert not isinstance(direct.connection_pool, SentinelConnectionPool)


def test_tls_reaches_the_primary_and_the_sentinels(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    settings = load_settings(
        {}, redis_url="rediss://sieve-primary/0", redis_sentinels=SENTINELS, redis_tls_ca_file=ca
    )
    pool = redis_conn.client(settings, timeout_s=0.5).connection_pool
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    assert pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert "SSL" in pool.connection_class.__name__
    sentinel_pool = pool.sentinel_manager.sentinels[0].connection_pool
    assert sentinel_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    config = celery_config(settings)
    assert config["broker_use_ssl"]["ssl_ca_certs"] == str(ca)
    assert config["broker_transport_options"]["sentinel_kwargs"]["ssl"] is True


def test_logs_and_reasons_never_show_either_password() -> None:
    settings = load_settings(
        {},
        redis_url="redis://:primary-pw@sieve-primary/0",
        redis_sentinels=SENTINELS,
        redis_sentinel_password="s-pw",
    )
    assert redis_conn.scrub("auth primary-pw then s-pw", settings) == "auth *** then ***"
    assert redis_conn.describe(settings) == f"redis://:***@sieve-primary/0 via Sentinels {SENTINELS}"
    assert settings.redacted()["redis_sentinel_password"] != "s-pw"
