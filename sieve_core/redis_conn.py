"""The one place that turns Settings into Redis connections: redis-py clients and Celery's TLS options.

The server (dispatcher, caches, job embedder), the workers (token and score caches, broker, result
backend) and `sieve run` all connect through here, so a password in SIEVE_REDIS_URL and TLS
(`rediss://` plus SIEVE_REDIS_TLS_CA_FILE / _CERT_FILE / _KEY_FILE) reach every connection alike:

- `redis://:PASSWORD@host:6379/0` (or `redis://USER:PASSWORD@...` with Redis ACLs): the password is
  part of the URL, which every site takes as it is; it is never logged (see `describe` and `scrub`).
- `rediss://host:6380/0`: TLS. The server's certificate is always verified (`ssl_cert_reqs` required),
  against SIEVE_REDIS_TLS_CA_FILE when set, else the system's CA store; a client certificate
  (SIEVE_REDIS_TLS_CERT_FILE + _KEY_FILE) is presented when set, for `tls-auth-clients yes`. A URL that
  carries its own `ssl_cert_reqs=...` query parameter keeps it, for the broker and backend too.

TLS files with a plain `redis://` URL are refused rather than ignored: a deployment that meant TLS and
got a cleartext connection would not notice otherwise.

Redis Sentinel (SIEVE_REDIS_SENTINELS=host:port,...): SIEVE_REDIS_URL then names the primary the Sentinels
watch instead of an address (`redis://:PASSWORD@MASTER/0`, the convention of redis-rb and GitLab), and
every connection asks the Sentinels where that primary is: redis-py clients through
`Sentinel(...).master_for(MASTER)`, Celery's broker and result backend through `sentinel://` URLs with the
`master_name` transport option. After a failover a broken connection is opened again to the new primary
(redis-py re-asks the Sentinels on connect, and turns a demoted primary's READONLY reply into a connection
error). The password and TLS options of the URL apply to the primary as before; the Sentinels get the
same TLS options and their own password (SIEVE_REDIS_SENTINEL_PASSWORD).
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from sieve_core.config import Settings, redact_url, sentinel_addresses

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
}
_SETTING = {
    "ssl_ca_certs": "SIEVE_REDIS_TLS_CA_FILE",
    "ssl_certfile": "SIEVE_REDIS_TLS_CERT_FILE",
    "ssl_keyfile": "SIEVE_REDIS_TLS_KEY_FILE",
}


class RedisConfigError(ValueError):
    """SIEVE_REDIS_URL and the SIEVE_REDIS_TLS_* settings do not fit together."""


def redis_url(settings: Settings) -> str:
    """SIEVE_REDIS_URL in clear (with its password): for connecting only, never for a log line."""
    if settings.redis_url is None:
        raise RedisConfigError("SIEVE_REDIS_URL is not set")
    return settings.redis_url.get_secret_value()


def describe(settings: Settings) -> str:
    """SIEVE_REDIS_URL with its password masked (and the Sentinels asked), for log lines and error messages."""
    if settings.redis_url is None:
        return "unset"
    text = redact_url(settings.redis_url.get_secret_value())
    return f"{text} via Sentinels {settings.redis_sentinels}" if settings.redis_sentinels else text


def scrub(text: str, settings: Settings) -> str:
    """`text` (e.g. an exception message on its way into a response or a log) without the Redis password."""
    secrets = []
    if settings.redis_url is not None:
        secrets.append(urlsplit(settings.redis_url.get_secret_value()).password)
    if settings.redis_sentinel_password is not None:
        secrets.append(settings.redis_sentinel_password.get_secret_value())
    for password in filter(None, secrets):
        for form in {password, unquote(password)}:  # as written in the URL, and as sent to Redis
            text = text.replace(form, "***")
    return text


def explain(exc: BaseException, settings: Settings, limit: int = 300) -> str:
    """`Type: message` of the Redis error behind `exc`, for a stage report or a job's reason: Celery and
    kombu wrap it (e.g. "Retry limit exceeded ... result store"), which would hide that the password was
    wrong or the certificate untrusted. Never with the password in it."""
    found: BaseException | None = exc
    seen: set[int] = set()
    while found is not None and id(found) not in seen:
        if isinstance(found, redis.RedisError):
            exc = found
            break
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    message = " ".join(str(exc).split())  # one line: Celery's messages span several
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return scrub(text, settings)[:limit]


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme == "rediss"


def ssl_options(settings: Settings, url: str | None = None) -> dict[str, Any]:
    """The TLS keyword arguments for a connection to `url` (default SIEVE_REDIS_URL); {} for `redis://`.

    The keys are those of redis-py's SSLConnection, which are also the keys that Celery documents for
    `broker_use_ssl` and `redis_backend_use_ssl` with a Redis broker and result backend.
    """
    url = redis_url(settings) if url is None else url
    files = {
        "ssl_ca_certs": settings.redis_tls_ca_file,
        "ssl_certfile": settings.redis_tls_cert_file,
        "ssl_keyfile": settings.redis_tls_key_file,
    }
    if not uses_tls(url):
        given = [_SETTING[key] for key, path in files.items() if path is not None]
        if given:
            raise RedisConfigError(
                f"{', '.join(given)} set, but SIEVE_REDIS_URL ({redact_url(url)}) does not use TLS: "
                "write it as rediss://HOST:PORT/DB"
            )
        return {}
    if settings.redis_tls_key_file and not settings.redis_tls_cert_file:
        raise RedisConfigError("SIEVE_REDIS_TLS_KEY_FILE is set without SIEVE_REDIS_TLS_CERT_FILE")
    for key, path in files.items():
        if path is not None and not path.is_file():
            raise RedisConfigError(f"{_SETTING[key]}: {path} does not exist or is not a file")
    options: dict[str, Any] = {key: str(path) for key, path in files.items() if path is not None}
    options["ssl_cert_reqs"] = _cert_reqs_in(url)
    return options


def _cert_reqs_in(url: str) -> ssl.VerifyMode:
    """`ssl_cert_reqs` from the URL's query string if it has one, else required (verify the server)."""
    values = parse_qs(urlsplit(url).query).get("ssl_cert_reqs")
    if not values:
        return ssl.CERT_REQUIRED
    mode = _CERT_REQS.get(values[-1].strip().lower())
    if mode is None:
        raise RedisConfigError(
            f"ssl_cert_reqs={values[-1]!r} in SIEVE_REDIS_URL: expected required, optional or none"
        )
    return mode


def client(
    settings: Settings,
    *,
    timeout_s: float,
    connect_timeout_s: float | None = None,
    url: str | None = None,
) -> redis.Redis:
    """A redis-py client for SIEVE_REDIS_URL (or `url`, e.g. the local Redis `sieve run` starts), with the
    password and TLS options applied and the caller's socket timeouts. Connects lazily, on first use."""
    connect_s = timeout_s if connect_timeout_s is None else connect_timeout_s
    if url is None and settings.redis_sentinels:
        return _sentinel_client(settings, timeout_s, connect_s)
    url = redis_url(settings) if url is None else url
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=connect_s, **ssl_options(settings, url)
    )


def master_name(settings: Settings) -> str:
    """The name of the primary the Sentinels watch: SIEVE_REDIS_URL's host in Sentinel mode."""
    return urlsplit(redis_url(settings)).hostname or ""


def _primary_auth(url: str) -> dict[str, Any]:
    """username, password and db of SIEVE_REDIS_URL, for the primary a Sentinel points at."""
    parts = urlsplit(url)
    auth: dict[str, Any] = {"db": int(parts.path.strip("/") or 0)}
    if parts.username:
        auth["username"] = unquote(parts.username)
    if parts.password:
        auth["password"] = unquote(parts.password)
    return auth


def _sentinel_kwargs(settings: Settings, timeout_s: float, connect_s: float) -> dict[str, Any]:
    """Connection options for the Sentinels themselves: timeouts (none would hang on a lost Sentinel),
    their password, and TLS like the primary's."""
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": connect_s}
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    tls = ssl_options(settings)
    return {**options, "ssl": True, **tls} if tls else options


def _sentinel_client(settings: Settings, timeout_s: float, connect_s: float) -> redis.Redis:
    tls = ssl_options(settings)
    sentinel = Sentinel(
        sentinel_addresses(settings.redis_sentinels),
        sentinel_kwargs=_sentinel_kwargs(settings, timeout_s, connect_s),
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_s,
        **({"ssl": True, **tls} if tls else {}),
    )
    return sentinel.master_for(master_name(settings), **_primary_auth(redis_url(settings)))


def celery_connection(settings: Settings) -> dict[str, Any]:
    """Celery's broker_url and result_backend for SIEVE_REDIS_URL, with TLS (`celery_ssl_options`) and, in
    Sentinel mode, `sentinel://` URLs (one per Sentinel, `;`-separated, as kombu and Celery's
    SentinelBackend read them) and the transport options naming the primary and how to reach the Sentinels:
    `broker_transport_options` and `result_backend_transport_options` (the caller may add its own keys)."""
    url = redis_url(settings)
    config: dict[str, Any] = {"broker_url": url, "result_backend": url, **celery_ssl_options(settings)}
    if not settings.redis_sentinels:
        return config
    # The primary's user and password as written in SIEVE_REDIS_URL (kombu and Celery take them from here).
    netloc = urlsplit(url).netloc
    userinfo = netloc.rpartition("@")[0] + "@" if "@" in netloc else ""
    db = _primary_auth(url)["db"]
    joined = ";".join(
        f"sentinel://{userinfo}{f'[{host}]' if ':' in host else host}:{port}/{db}"
        for host, port in sentinel_addresses(settings.redis_sentinels)
    )
    transport = {
        "master_name": master_name(settings),
        "sentinel_kwargs": _sentinel_kwargs(settings, 2.0, 2.0),
    }
    config.update(
        broker_url=joined,
        result_backend=joined,
        broker_transport_options=dict(transport),
        result_backend_transport_options=dict(transport),
    )
    return config


def celery_ssl_options(settings: Settings) -> dict[str, Any]:
    """Celery settings for TLS to the Redis broker and result backend: `broker_use_ssl` and
    `redis_backend_use_ssl`, both the same dict (ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile);
    empty for a `redis://` URL. Without them Celery would refuse a `rediss://` result backend and kombu
    would connect to the broker without verifying its certificate."""
    options = ssl_options(settings)
    if not options:
        return {}
    return {"broker_use_ssl": dict(options), "redis_backend_use_ssl": dict(options)}
