"""Redis with a password and Redis over TLS, through every connection: server, Celery broker and result
backend, the worker's caches.

Real redis-server processes (one with `--requirepass`, TLS-only ones with a CA and certificates made
by tests/certs.py), a real Celery worker and an in-process gRPC server: an index job embedded by the
worker (broker, result backend, worker), then a late-interaction search whose query vectors the server
caches in Redis and a second one answered from that cache. And what a wrong password, an untrusted server
certificate or a missing client certificate give: an index job that fails with a reason that says why
and never shows the password, while searches (late interaction included: it needs no Redis) go on. Plus
the option mapping of sieve_core.redis_conn itself.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, jobs_pb2, search_pb2

from sieve_cli.stack import RedisTls
from sieve_core import redis_conn
from sieve_core.config import Settings
from sieve_core.tasking import celery_config
from tests.certs import Certs, make_certs
from tests.conftest import (
    Api,
    RedisServer,
    Worker,
    make_settings,
    run_index_job,
    start_api,
    start_worker,
    stop_api,
)
from tests.corpus import DOCS as ALL_DOCS
from tests.corpus import QUERY
from workers.celery_app import create_app

aio = pytest.mark.asyncio(loop_scope="session")

PASSWORD = f"pw-{uuid.uuid4().hex}"  # unique, so that finding it in a log or a message means a leak
WRONG = f"wrong-{uuid.uuid4().hex}"
DOCS = {k: v for k, v in ALL_DOCS.items() if k != "coffee"}  # five
LATE = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, retrieve_candidates=5, late_interaction_keep=3
)


# -- certificates -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _require_tls_redis() -> None:
    """Skip unless this redis-server was built with TLS (Debian's is)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it via scripts/ensure_redis.sh)")
    # Built with TLS, it accepts --tls-port and then exits as it has nothing to listen on; without TLS
    # support it refuses the directive as a config error.
    out = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=30
    )
    text = out.stdout + out.stderr
    if "FATAL CONFIG" in text or "Bad directive" in text:
        pytest.skip(f"this redis-server is built without TLS: {text.strip()[-300:]}")


# -- helpers ------------------------------------------------------------------------------------------
async def _collection(api: Api, docs: dict[str, str] = DOCS) -> str:
    name = f"sec-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(name=name, token_storage=collections_pb2.TokenStorage())
        )
    )
    if docs:
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in docs.items()]
            )
        )
    return name


async def _index_job(api: Api, name: str, path: Path, tag: str = "") -> jobs_pb2.Job:
    """An index job of DOCS (ids prefixed, texts suffixed with `tag`, so they need embedding anew)."""
    lines = "".join(f'{{"id": "{tag}{i}", "text": "{t} {tag}"}}\n' for i, t in DOCS.items())
    await asyncio.to_thread(path.write_text, lines)
    return await run_index_job(api, name, path)


async def _job_then_cached_search(api: Api, tmp_path: Path) -> None:
    """An index job COMPLETED by the worker (broker and result backend), then the same late-interaction
    search twice: the second takes the query's vectors from the server's Redis cache."""
    name = await _collection(api, {})
    final = await _index_job(api, name, tmp_path / "job.jsonl")
    assert (final.state, final.done, final.embedder) == (
        jobs_pb2.JOB_STATE_SUCCEEDED,
        len(DOCS),
        "workers",
    ), final
    request = search_pb2.SearchRequest(
        collection=name, query=f"{QUERY} {uuid.uuid4().hex[:6]}", top_k=3, settings=LATE
    )
    cold = await api.search.Search(request, timeout=60)
    late = cold.stages[1]
    assert late.status == search_pb2.STAGE_STATUS_COMPLETED, late.reason
    assert (late.token_source, late.query_token_source) == ("store", "encoder pass"), late
    assert cold.hits[0].id == "aspirin"
    warm = await api.search.Search(request, timeout=60)
    assert warm.stages[1].query_token_source == "cache", warm.stages[1]
    assert [h.id for h in warm.hits] == [h.id for h in cold.hits]


def _wait_for_task_line(worker: Worker) -> str:
    """The worker's log once it has its end-of-task line for the embed task (written just after the result
    is stored, so it can trail the job's progress by a moment on a loaded machine: 30 s of slack)."""
    deadline = time.monotonic() + 30
    while True:
        text = worker.log.read_text(errors="replace")
        if "task sieve.embed SUCCESS" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


async def _job_failure(settings: Settings, tmp_path: Path) -> str:
    """On a server with these settings (Redis unusable): late interaction still completes from the store,
    an index job fails; returns the job's reason."""
    api = await start_api(settings)
    try:
        name = await _collection(api)
        response = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE), timeout=30
        )
        assert response.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED, response.stages[1]
        final = await _index_job(api, name, tmp_path / "failing.jsonl", tag="new")
        assert final.state == jobs_pb2.JOB_STATE_FAILED, final
        assert "Redis was unreachable" in final.reason, final.reason
        return final.reason  # type: ignore[no-any-return]
    finally:
        await stop_api(api)


# -- sieve_core.redis_conn: the options every site gets ------------------------------------------------
def _settings(tmp_path: Path, **values: Any) -> Settings:
    return make_settings(tmp_path, **values)


def test_plain_url_gets_no_tls_options_and_tls_files_need_rediss(tmp_path: Path, certs: Certs) -> None:
    plain = _settings(tmp_path, redis_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0")
    assert redis_conn.ssl_options(plain) == {} and redis_conn.celery_ssl_options(plain) == {}
    assert "broker_use_ssl" not in celery_config(plain)
    mistaken = _settings(tmp_path, redis_url="redis://127.0.0.1:6379/0", redis_tls_ca_file=certs.ca)
    with pytest.raises(redis_conn.RedisConfigError, match="SIEVE_REDIS_TLS_CA_FILE.*rediss://"):
        redis_conn.client(mistaken, timeout_s=1)
    with pytest.raises(redis_conn.RedisConfigError):
        celery_config(mistaken)


def test_rediss_options_for_redis_py_and_celery(tmp_path: Path, certs: Certs) -> None:
    settings = _settings(
        tmp_path,
        redis_url=f"rediss://:{PASSWORD}@127.0.0.1:6380/0",
        redis_tls_ca_file=certs.ca,
        redis_tls_cert_file=certs.client_cert,
        redis_tls_key_file=certs.client_key,
    )
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert),
        "ssl_keyfile": str(certs.client_key),
    }
    assert redis_conn.ssl_options(settings) == expected
    config = celery_config(settings)
    # The keys Celery documents for a Redis broker and result backend over TLS.
    assert config["broker_use_ssl"] == config["redis_backend_use_ssl"] == expected
    pool_kwargs = redis_conn.client(settings, timeout_s=0.5).connection_pool.connection_kwargs
    assert pool_kwargs["ssl_ca_certs"] == str(certs.ca) and pool_kwargs["password"] == PASSWORD
    assert pool_kwargs["socket_timeout"] == 0.5

    # No CA file: the system's CA store, still verified. The URL's own ssl_cert_reqs wins everywhere.
    system = _settings(tmp_path, redis_url="rediss://127.0.0.1:6380/0")
    assert redis_conn.ssl_options(system) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    relaxed = _settings(tmp_path, redis_url="rediss://127.0.0.1:6380/0?ssl_cert_reqs=none")
    assert celery_config(relaxed)["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}

    with pytest.raises(redis_conn.RedisConfigError, match="SIEVE_REDIS_TLS_CERT_FILE"):
        redis_conn.ssl_options(
            _settings(tmp_path, redis_url="rediss://h:1/0", redis_tls_key_file=certs.client_key)
        )
    with pytest.raises(redis_conn.RedisConfigError, match="does not exist"):
        redis_conn.ssl_options(
            _settings(tmp_path, redis_url="rediss://h:1/0", redis_tls_ca_file=tmp_path / "missing.pem")
        )


def test_the_password_is_masked(tmp_path: Path) -> None:
    settings = _settings(tmp_path, redis_url=f"redis://sieve:{PASSWORD}@127.0.0.1:6379/0")
    assert redis_conn.describe(settings) == "redis://sieve:***@127.0.0.1:6379/0"
    assert PASSWORD not in str(settings.redacted()) and PASSWORD not in repr(settings)
    assert (
        redis_conn.scrub(f"error at redis://sieve:{PASSWORD}@host", settings)
        == "error at redis://sieve:***@host"
    )
    encoded = _settings(tmp_path, redis_url="redis://:p%40ss@127.0.0.1:6379/0")  # the password is p@ss
    assert redis_conn.scrub("sent p@ss, the URL has p%40ss", encoded) == "sent ***, the URL has ***"


async def _job_through_a_worker(
    redis_url: str, settings: Settings, tmp_path: Path, name: str, extra_env: dict[str, str] | None = None
) -> str:
    """A worker and a server on the Redis at `redis_url`: an index job embedded by the worker, then a
    cached search. Returns the worker's log, which records the job's embed task."""
    worker = start_worker(
        redis_url, create_app(settings), tmp_path / "worker.log", extra_env=extra_env, name=name
    )
    try:
        api = await start_api(settings)
        try:
            await _job_then_cached_search(api, tmp_path)
        finally:
            await stop_api(api)
        worker_log = _wait_for_task_line(worker)
    finally:
        worker.kill()
    assert f"task sieve.embed SUCCESS: {len(DOCS)} items" in worker_log, worker_log[-2000:]
    return worker_log


# -- a password-protected Redis --------------------------------------------------------------------------
@aio
async def test_password_through_server_and_worker(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", password=PASSWORD)
    server.start()
    try:
        with pytest.raises(redis.AuthenticationError):  # it really requires the password
            redis.Redis(port=server.port, socket_timeout=2).ping()
        settings = make_settings(tmp_path / "data", redis_url=server.url)
        worker_log = await _job_through_a_worker(server.url, settings, tmp_path, name="password")
        assert "Connected to redis://:**@" in worker_log  # Celery masks it in its banner and lines
        assert PASSWORD not in worker_log

        # A wrong password: searches go on; an index job fails once Redis stayed unusable for its timeout,
        # saying why, and neither password shows.
        wrong_url = server.url.replace(PASSWORD, WRONG)
        wrong = make_settings(tmp_path / "wrong", redis_url=wrong_url, job_worker_timeout_s=1.0)
        reason = await _job_failure(wrong, tmp_path)
        assert "AuthenticationError" in reason, reason
        assert WRONG not in reason and PASSWORD not in reason
    finally:
        server.stop()
    for secret in (PASSWORD, WRONG):
        assert secret not in caplog.text  # nothing the server (or its Celery client) logged shows it


# -- Redis over TLS -------------------------------------------------------------------------------------
@aio
@pytest.mark.parametrize("mutual", [False, True], ids=["server-cert", "client-cert"])
async def test_tls_through_server_and_worker(mutual: bool, certs: Certs, tmp_path: Path) -> None:
    _require_tls_redis()
    tls = RedisTls(
        ca=certs.ca,
        cert=certs.server_cert,
        key=certs.server_key,
        client_cert=certs.client_cert if mutual else None,
        client_key=certs.client_key if mutual else None,
    )
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", tls=tls)
    server.start()
    try:
        with pytest.raises(redis.ConnectionError):  # TLS only: a plain connection gets nowhere
            redis.Redis(port=server.port, socket_timeout=2, socket_connect_timeout=2).ping()
        files: dict[str, Path] = {"redis_tls_ca_file": certs.ca}
        if mutual:
            files.update(redis_tls_cert_file=certs.client_cert, redis_tls_key_file=certs.client_key)
        settings = make_settings(tmp_path / "data", redis_url=server.url, **files)
        env = {f"SIEVE_{key.upper()}": str(path) for key, path in files.items()}
        worker_log = await _job_through_a_worker(server.url, settings, tmp_path, name="tls", extra_env=env)
        assert "Connected to rediss://" in worker_log

        if mutual:  # no client certificate: the server refuses the handshake
            without = {"redis_tls_ca_file": certs.ca}
            await _job_failure(
                make_settings(tmp_path / "nocert", redis_url=server.url, job_worker_timeout_s=1.0, **without),
                tmp_path,
            )
        else:  # a CA that did not sign the server's certificate: verification fails
            untrusted = {"redis_tls_ca_file": certs.other_ca}
            reason = await _job_failure(
                make_settings(
                    tmp_path / "other", redis_url=server.url, job_worker_timeout_s=1.0, **untrusted
                ),
                tmp_path,
            )
            assert "CERTIFICATE_VERIFY_FAILED" in reason, reason
    finally:
        server.stop()
