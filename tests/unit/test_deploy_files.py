"""Docker cannot run here: check what can be checked in the Dockerfile and docker-compose.yml."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sieve_core.config import Settings
from tests.conftest import ROOT

yaml = pytest.importorskip("yaml")


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_sieve_setting_in_compose_is_real() -> None:
    for name, service in _compose()["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("SIEVE_"):
                assert key[len("SIEVE_") :].lower() in Settings.model_fields, f"{name}: unknown setting {key}"


def test_every_sieve_command_exists() -> None:
    from sieve_cli.main import build_parser

    commands = [
        s["command"] for s in _compose()["services"].values() if s.get("command", [None])[0] == "sieve"
    ]
    commands += [
        s["healthcheck"]["test"][1:]
        for s in _compose()["services"].values()
        if "healthcheck" in s and s["healthcheck"]["test"][1] == "sieve"
    ]
    docker = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^(?:CMD|HEALTHCHECK .*CMD) (\[.*\])$", docker, re.M):
        commands.append(yaml.safe_load(line))
    assert len(commands) >= 4
    for argv in commands:
        build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown command or option


def test_dockerfile_env_settings_are_real_and_copied_paths_exist() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    for key in re.findall(r"\b(SIEVE_[A-Z_]+)=", docker):
        assert key[len("SIEVE_") :].lower() in Settings.model_fields, key
    for src in re.findall(r"^COPY (?!--from)(\S+)", docker, re.M):
        assert (ROOT / src).exists(), src
    # The module the model stage runs exists and takes that option.
    out = subprocess.run(
        [sys.executable, "-m", "sieve_core.models.prepare", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "--models-dir" in out.stdout


def test_celery_services_use_real_queues_and_commands() -> None:
    import os

    from sieve_core.tasking import QUEUES

    services = _compose()["services"]
    celery_commands = [s["command"] for s in services.values() if s.get("command", [None])[0] == "celery"]
    assert len(celery_commands) >= 3
    queues_served = set()
    for argv in celery_commands:
        assert argv[1:3] == ["-A", "workers.celery_app"]
        if "-Q" in argv:
            queues = argv[argv.index("-Q") + 1].split(",")
            assert set(queues) <= set(QUEUES), queues
            queues_served |= set(queues)
        # The subcommand and its options parse (help is printed without connecting to Redis).
        env = {**os.environ, "SIEVE_REDIS_URL": "redis://127.0.0.1:1/0"}
        out = subprocess.run(
            [sys.executable, "-m", "celery", *argv[1:], "--help"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, (argv, out.stderr[-1500:])
    assert {"embed", "colbert"} <= queues_served
    for name, service in services.items():
        if name != "redis":
            assert service.get("build") == ".", f"{name} does not run the project image"


def test_cross_encoder_service_mounts_the_model_it_names() -> None:
    services = _compose()["services"]
    worker = services["worker-cross-encoder"]
    assert worker["profiles"] == ["cross-encoder"] and "cross_encoder" in worker["command"]
    for service in (worker, services["server"]):
        assert service["environment"]["SIEVE_CROSS_ENCODER_MODEL"] == "${SIEVE_CROSS_ENCODER_MODEL:-}"
        name = "${SIEVE_CROSS_ENCODER_MODEL:-none}"
        assert f"./models/{name}:/models/{name}:ro" in service["volumes"]
    from sieve_core.config import load_settings

    assert load_settings({"SIEVE_CROSS_ENCODER_MODEL": ""}).cross_encoder_model is None
