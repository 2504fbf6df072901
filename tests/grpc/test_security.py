"""API keys with roles and TLS on the gRPC port, against real servers.

Keys are unique per run (uuid), so that finding one in a log line or an error message means a leak.
Certificates (a CA, a server certificate for localhost and 127.0.0.1, a client certificate) are made at
test time by tests/certs.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sieve import AsyncSieveClient, PermissionDenied, RetryPolicy, Unauthenticated, Unavailable
from sieve.v1 import collections_pb2, documents_pb2, jobs_pb2, search_pb2

from server.app import SERVICE_NAMES, SieveServer
from server.transport.security import METHOD_ROLES, ConfigError, Role, load_keys, server_credentials
from sieve_cli.stack import free_port
from tests.certs import Certs, make_certs
from tests.conftest import MODELS_DIR, ROOT, Api, make_settings, require_bundle, start_api, stop_api

READ_KEY = f"read-{uuid.uuid4().hex}"
WRITE_KEY = f"write-{uuid.uuid4().hex}"
ADMIN_KEY = f"admin-{uuid.uuid4().hex}"
WRONG_KEY = f"wrong-{uuid.uuid4().hex}"
ALL_KEYS = (READ_KEY, WRITE_KEY, ADMIN_KEY, WRONG_KEY)
KEYS_BY_ROLE = {Role.READ: READ_KEY, Role.WRITE: WRITE_KEY, Role.ADMIN: ADMIN_KEY}


def _assert_no_key(text: str) -> None:
    for key in ALL_KEYS:
        assert key not in text, "an API key leaked"


# -- parsing the keys ---------------------------------------------------------------------------------


def test_every_sieve_method_has_a_role() -> None:
    methods = {
        f"/{service.full_name}/{m.name}"
        for module in (collections_pb2, documents_pb2, jobs_pb2, search_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert methods == set(METHOD_ROLES)
    by_role = {role: {m.rsplit("/", 1)[1] for m, r in METHOD_ROLES.items() if r == role} for role in Role}
    assert by_role == {
        Role.READ: {
            "GetCollection",
            "ListCollections",
            "GetDocuments",
            "Search",
            "SearchStream",
            "GetJob",
            "WatchJob",
            "ListJobs",
        },
        Role.WRITE: {"UpsertDocuments", "DeleteDocuments", "StartIndexJob", "UploadIndexJob", "CancelJob"},
        Role.ADMIN: {"CreateCollection", "DeleteCollection"},
    }
    assert {f"/{n}/" for n in SERVICE_NAMES} == {m[: m.rindex("/") + 1] for m in methods}


def test_keys_from_the_setting_and_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# operators\n{ADMIN_KEY}:admin   # on-call\n\n  {WRITE_KEY}:Write\n")
    settings = make_settings(
        tmp_path, api_keys=f"{READ_KEY}:read,{WRITE_KEY}:write,", api_keys_file=keys_file
    )
    ring = load_keys(settings)
    assert ring is not None and len(ring) == 3
    assert [ring.role_of(k) for k in (READ_KEY, WRITE_KEY, ADMIN_KEY, WRONG_KEY)] == [
        Role.READ,
        Role.WRITE,
        Role.ADMIN,
        None,
    ]
    assert load_keys(make_settings(tmp_path)) is None  # no keys: no authentication


@pytest.mark.parametrize(
    ("api_keys", "file_text", "expected"),
    [
        (f"{READ_KEY}:reader", None, "SIEVE_API_KEYS entry 1: unknown role 'reader'"),
        (f"{READ_KEY}:read,:write", None, "SIEVE_API_KEYS entry 2: the key is empty"),
        (f"{READ_KEY}", None, "SIEVE_API_KEYS entry 1: expected KEY:ROLE"),
        (f"{READ_KEY}:read,{READ_KEY}:admin", None, "entry 2: the same key is also given at"),
        (None, f"{WRITE_KEY}:write\n{WRITE_KEY}:read\n", "line 2: the same key is also given at"),
        (f"{READ_KEY}:read", f"\n{READ_KEY}:admin\n", "line 2: the same key is also given at"),
        (None, f"{READ_KEY} x:read\n", "line 1: the key must be printable ASCII without spaces"),
        (" , ", None, "give no key"),
    ],
    ids=[
        "unknown-role",
        "empty-key",
        "no-role",
        "two-roles",
        "two-roles-file",
        "two-roles-both",
        "space",
        "none",
    ],
)
def test_malformed_keys_stop_the_start(
    tmp_path: Path, api_keys: str | None, file_text: str | None, expected: str
) -> None:
    keys_file = None
    if file_text is not None:
        keys_file = tmp_path / "keys"
        keys_file.write_text(file_text)
    settings = make_settings(tmp_path, api_keys=api_keys, api_keys_file=keys_file)
    with pytest.raises(ConfigError) as err:
        SieveServer(settings)
    assert expected in err.value.message
    _assert_no_key(err.value.message)


def test_an_unreadable_keys_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read SIEVE_API_KEYS_FILE"):
        load_keys(make_settings(tmp_path, api_keys_file=tmp_path / "missing"))


def test_settings_log_line_masks_the_keys(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=f"{READ_KEY}:read")
    line = json.dumps(settings.redacted())
    _assert_no_key(line)
    assert settings.redacted()["api_keys"] == "**********"


# -- roles against a real server ------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def guarded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    settings = make_settings(
        tmp_path_factory.mktemp("guarded"),
        api_keys=f"{READ_KEY}:read,{WRITE_KEY}:write,{ADMIN_KEY}:admin",
    )
    running = await start_api(settings)
    yield running
    await stop_api(running)


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _raw_call(api: Api, method: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """Call `method` with an empty request; the status it ends with."""
    try:
        if method.endswith("/UploadIndexJob"):

            async def nothing() -> AsyncIterator[bytes]:
                return
                yield b""

            await api.channel.stream_unary(method)(nothing(), metadata=metadata, timeout=30)
        elif method.endswith("/WatchJob"):
            async for _ in api.channel.unary_stream(method)(b"", metadata=metadata, timeout=30):
                pass
        else:
            await api.channel.unary_unary(method)(b"", metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as exc:
        _assert_no_key(exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


async def test_each_method_needs_its_role(guarded: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for method, needed in sorted(METHOD_ROLES.items()):
        assert await _raw_call(guarded, method, ()) == grpc.StatusCode.UNAUTHENTICATED, method
        assert await _raw_call(guarded, method, _bearer(WRONG_KEY)) == grpc.StatusCode.UNAUTHENTICATED
        assert await _raw_call(guarded, method, (("authorization", READ_KEY),)) == (
            grpc.StatusCode.UNAUTHENTICATED  # no "Bearer "
        )
        for role, key in KEYS_BY_ROLE.items():
            code = await _raw_call(guarded, method, _bearer(key))
            # Past the check, an empty request fails on its content (or succeeds): never an auth code.
            if role < needed:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method, role)
            else:
                assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    _assert_no_key(caplog.text)


async def test_the_python_client_with_keys(guarded: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    name = f"sec-{uuid.uuid4().hex[:8]}"
    async with (
        AsyncSieveClient(guarded.address, api_key=ADMIN_KEY) as admin,
        AsyncSieveClient(guarded.address, api_key=WRITE_KEY) as writer,
        AsyncSieveClient(guarded.address, api_key=READ_KEY) as reader,
        AsyncSieveClient(guarded.address, api_key=WRONG_KEY, retry=RetryPolicy(max_attempts=1)) as stranger,
    ):
        with pytest.raises(PermissionDenied) as denied:
            await writer.create_collection(name)
        assert "CreateCollection needs an API key with the admin role" in denied.value.message
        await admin.create_collection(name)
        with pytest.raises(PermissionDenied, match="the write role; this key has the read role"):
            await reader.upsert_documents(name, [documents_pb2.Document(id="a", text="a cat on a mat")])
        await writer.upsert_documents(name, [documents_pb2.Document(id="a", text="a cat on a mat")])
        hits = (await reader.search(name, "cat")).hits
        assert [h.id for h in hits] == ["a"]
        with pytest.raises(Unauthenticated, match="unknown API key") as unknown:
            await stranger.search(name, "cat")
        assert unknown.value.attempts == 1  # not retried
        await admin.delete_collection(name)

    # Health and reflection stay open without a key.
    health = health_pb2_grpc.HealthStub(guarded.channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest())
    ).status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    async for answer in reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        assert "sieve.v1.SearchService" in {s.name for s in answer.list_services_response.service}
    _assert_no_key(caplog.text)


# -- TLS -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_settings_that_cannot_work_stop_the_start(tmp_path: Path, certs: Certs) -> None:
    cases = [
        ({"tls_cert_file": certs.server_cert}, "SIEVE_TLS_CERT_FILE is set but SIEVE_TLS_KEY_FILE is not"),
        ({"tls_key_file": certs.server_key}, "SIEVE_TLS_KEY_FILE is set but SIEVE_TLS_CERT_FILE is not"),
        ({"tls_client_ca_file": certs.ca}, "client certificates need TLS"),
        (
            {"tls_cert_file": certs.server_cert, "tls_key_file": certs.client_key},
            "are not a PEM certificate chain and its private key",
        ),
        (
            {"tls_cert_file": certs.server_cert, "tls_key_file": tmp_path / "nope.key"},
            "cannot read SIEVE_TLS_KEY_FILE",
        ),
        (
            {
                "tls_cert_file": certs.server_cert,
                "tls_key_file": certs.server_key,
                "tls_client_ca_file": certs.server_key,
            },
            "SIEVE_TLS_CLIENT_CA_FILE",
        ),
    ]
    for values, expected in cases:
        with pytest.raises(ConfigError) as err:
            server_credentials(make_settings(tmp_path, **values))
        assert expected in err.value.message, values


async def _tls_api(tmp_path: Path, certs: Certs, mtls: bool) -> Api:
    settings = make_settings(
        tmp_path,
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca if mtls else None,
    )
    return await start_api(settings)  # its own channel is plaintext: the refused client below


async def _plaintext_fails(api: Api) -> None:
    async with AsyncSieveClient(api.address, retry=RetryPolicy(max_attempts=1)) as plain:
        with pytest.raises(Unavailable):
            await plain.list_collections(timeout=10)


async def test_tls_the_client_with_the_ca_searches_and_plaintext_fails(tmp_path: Path, certs: Certs) -> None:
    api = await _tls_api(tmp_path, certs, mtls=False)
    try:
        assert api.server.tls
        name = f"tls-{uuid.uuid4().hex[:8]}"
        for host in ("localhost", "127.0.0.1"):  # both names are in the certificate
            async with AsyncSieveClient(f"{host}:{api.server.port}", root_certificates=certs.ca) as client:
                await client.create_collection(f"{name}-{host.replace('.', '-')}")
        async with AsyncSieveClient(f"localhost:{api.server.port}", root_certificates=certs.ca) as client:
            await client.upsert_documents(
                f"{name}-localhost", [documents_pb2.Document(id="a", text="the cat on the mat")]
            )
            assert [h.id for h in (await client.search(f"{name}-localhost", "cat")).hits] == ["a"]
            health = health_pb2_grpc.HealthStub(client.channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        await _plaintext_fails(api)
    finally:
        await stop_api(api)


async def test_mtls_needs_a_client_certificate(tmp_path: Path, certs: Certs) -> None:
    api = await _tls_api(tmp_path, certs, mtls=True)
    try:
        address = f"localhost:{api.server.port}"
        async with AsyncSieveClient(
            address,
            root_certificates=certs.ca,
            private_key=certs.client_key,
            certificate_chain=certs.client_cert,
        ) as client:
            await client.list_collections(timeout=10)
        async with AsyncSieveClient(
            address, root_certificates=certs.ca, retry=RetryPolicy(max_attempts=1)
        ) as no_cert:
            with pytest.raises(Unavailable):
                await no_cert.list_collections(timeout=10)
        await _plaintext_fails(api)
    finally:
        await stop_api(api)


# -- a real `sieve serve` with TLS, keys and JSON logs: `sieve health`, the client, and the log ----------


def test_serve_with_tls_and_keys_logs_no_key(tmp_path: Path, certs: Certs) -> None:
    require_bundle()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{ADMIN_KEY}:admin\n")
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(
        SIEVE_DATA_DIR=str(tmp_path / "data"),
        SIEVE_MODELS_DIR=str(MODELS_DIR),
        SIEVE_GRPC_ADDRESS=address,
        SIEVE_METRICS_ADDRESS="",
        SIEVE_API_KEYS=f"{READ_KEY}:read",
        SIEVE_API_KEYS_FILE=str(keys_file),
        SIEVE_TLS_CERT_FILE=str(certs.server_cert),
        SIEVE_TLS_KEY_FILE=str(certs.server_key),
        SIEVE_LOG_FORMAT="json",
        SIEVE_LOG_LEVEL="DEBUG",
    )
    log = tmp_path / "server.log"
    cli = [sys.executable, "-m", "sieve_cli.main"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*cli, "serve"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        health = [*cli, "health", "--address", address, "--timeout", "60"]
        ok = subprocess.run(
            [*health, "--tls-ca", str(certs.ca)], env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert ok.returncode == 0, ok.stderr + log.read_text(errors="replace")
        assert "SERVING" in ok.stdout
        # The same check in plaintext against a TLS port fails (and says so).
        plain = subprocess.run([*health, "--timeout", "3"], env=env, cwd=ROOT, capture_output=True, text=True)
        assert plain.returncode == 1

        tls = ["--address", address, "--ca-cert", str(certs.ca), "--timeout", "30"]
        _cli(cli, env, "collections", "create", "notes", *tls, "--api-key", ADMIN_KEY)
        denied = subprocess.run(
            [*cli, "collections", "create", "more", *tls, "--api-key", READ_KEY],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert denied.returncode != 0 and "admin role" in denied.stderr, denied.stderr
        _assert_no_key(denied.stderr + denied.stdout)
        listed = _cli(cli, env, "collections", "list", *tls, "--api-key", READ_KEY)
        assert "notes" in listed
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert code == 0, text
    _assert_no_key(text)
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    assert any("API keys: 2 configured; TLS: on" in r["message"] for r in records)
    settings_line = next(r["message"] for r in records if r["message"].startswith("settings: "))
    assert json.loads(settings_line.removeprefix("settings: "))["api_keys"] == "**********"


def _cli(cli: list[str], env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*cli, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _assert_no_key(done.stderr + done.stdout)
    return done.stdout
