"""Settings (env prefix, injected environment, redaction), generated-code drift, and the CLI wiring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from sieve_core.config import Settings, load_settings, redact_url
from tests.conftest import ROOT


def test_env_prefix_and_overrides() -> None:
    s = load_settings(
        {
            "SIEVE_DATA_DIR": "/x",
            "SIEVE_GRPC_ADDRESS": "0.0.0.0:9",
            "SIEVE_MAX_TOP_K": "7",
            "OTHER": "ignored",
        },
        max_batch_documents=3,
    )
    assert (str(s.data_dir), s.grpc_address, s.max_top_k, s.max_batch_documents) == ("/x", "0.0.0.0:9", 7, 3)


def test_injected_environment_replaces_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIEVE_MAX_TOP_K", "3")
    assert load_settings({}).max_top_k == Settings.model_fields["max_top_k"].default
    assert load_settings().max_top_k == 3


@pytest.mark.parametrize(
    "env", [{"SIEVE_GRPC_ADDRESS": "nohost"}, {"SIEVE_MAX_TOP_K": "0"}, {"SIEVE_DEFAULT_METRIC": "hamming"}]
)
def test_invalid_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        load_settings(env)


def test_secrets_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings({"SIEVE_REDIS_URL": "redis://user:s3cret@redis:6379/0"})
    shown = json.dumps(s.redacted())
    assert "s3cret" not in shown and "redis://user:***@redis:6379/0" in shown
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("rediss://:pw@h:1") == "rediss://:***@h:1"


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_check_detects_drift(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Copy the generator and protos, edit a proto, and check that --check fails.
    import shutil

    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "clients" / "python" / "sieve", tmp_path / "clients" / "python" / "sieve")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gen_protos.py", tmp_path / "scripts")
    proto = tmp_path / "protos" / "sieve" / "v1" / "search.proto"
    proto.write_text(
        proto.read_text().replace(
            "bool omit_documents = 6;", "bool omit_documents = 6;\n  bool drift_probe = 999;"
        )
    )
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1 and "stale" in result.stderr


def test_sieve_command_is_installed() -> None:
    sieve = ROOT / ".venv" / "bin" / "sieve"
    if not sieve.exists():
        pytest.skip("not running from the project's .venv")
    out = subprocess.run([str(sieve), "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in out and "eval" in out


def test_settings_logged_once_redacted(capfd: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from server import app

    settings = load_settings(
        {},
        data_dir=tmp_path,
        grpc_address="127.0.0.1:0",
        models_dir=tmp_path / "none",
        redis_url="redis://:topsecret@localhost:1/0",
    )

    async def stop_at_once(server: app.SieveServer) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)

    asyncio.run(app.serve(settings, started=stop_at_once))
    logged = capfd.readouterr().err
    # Text format: "<time> INFO sieve.server [<request id>]: settings: {...}" (sieve_core.logs).
    lines = [line for line in logged.splitlines() if " sieve.server [" in line and "]: settings: " in line]
    assert len(lines) == 1 and ":***@" in lines[0]
    assert "topsecret" not in logged


def test_readme_settings_table_matches_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_checked_in_onnx_kernels_match_their_generator() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_kernels.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
