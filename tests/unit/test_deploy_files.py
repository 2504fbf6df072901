"""Docker cannot run here: check what can be checked in the Dockerfile and the compose files (docker-compose.yml
and its overrides: cross-encoder, Sentinel, several servers over PostgreSQL)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sieve_core.config import Settings
from tests.conftest import ROOT

yaml = pytest.importorskip("yaml")


OVERRIDE = "docker-compose.cross-encoder.yml"
# Every compose file: the base and each override (tests/unit/test_compose_sentinel.py and
# tests/unit/test_compose_servers.py check the last three in depth).
COMPOSE_FILES = (
    "docker-compose.yml",
    OVERRIDE,
    "docker-compose.sentinel.yml",
    "docker-compose.cross-encoder.sentinel.yml",
    "docker-compose.servers.yml",
)


def _compose(name: str = "docker-compose.yml") -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / name).read_text())


def _all_services() -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    """Every service definition of both compose files (the override's `server` only adds to the base's)."""
    return [(n, s) for f in ("docker-compose.yml", OVERRIDE) for n, s in _compose(f)["services"].items()]


def _every_file_services() -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    """(file: service, definition) of every compose file."""
    return [(f"{f}: {n}", s) for f in COMPOSE_FILES for n, s in _compose(f)["services"].items()]


def test_compose_files_are_all_checked() -> None:
    found = {p.name for p in ROOT.glob("docker-compose*.yml")}
    assert found == set(COMPOSE_FILES), "a compose file the tests do not read"


def test_every_sieve_setting_in_compose_is_real() -> None:
    for name, service in _every_file_services():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment as a mapping, so the tests can read it"
        for key in environment:
            if key.startswith("SIEVE_"):
                assert key[len("SIEVE_") :].lower() in Settings.model_fields, f"{name}: unknown setting {key}"


def test_every_sieve_command_exists() -> None:
    from sieve_cli.main import build_parser

    services = [s for _, s in _every_file_services()]
    commands = [s["command"] for s in services if s.get("command", [None])[0] == "sieve"]
    commands += [
        s["healthcheck"]["test"][1:]
        for s in services
        if "healthcheck" in s and s["healthcheck"]["test"][1] == "sieve"
    ]
    docker = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^(?:CMD|HEALTHCHECK .*CMD) (\[.*\])$", docker, re.M):
        commands.append(yaml.safe_load(line))
    assert len(commands) >= 6  # the base file's server, the servers file's server-2, their health checks
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

    services = dict(_all_services())
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
    for name, service in _all_services():
        if name not in ("redis", "server") or "command" in service:
            assert name == "redis" or service.get("build") == ".", f"{name} does not run the project image"


def test_cross_encoder_override_mounts_the_model_it_names_and_the_base_mounts_nothing() -> None:
    base = _compose()["services"]
    assert all("./models" not in str(s.get("volumes", [])) for s in base.values()), "the base mounts ./models"
    assert "worker-cross-encoder" not in base
    override = _compose(OVERRIDE)["services"]
    worker = override["worker-cross-encoder"]
    assert "cross_encoder" in worker["command"]
    for service in (worker, override["server"]):
        assert service["environment"]["SIEVE_CROSS_ENCODER_MODEL"].startswith("${SIEVE_CROSS_ENCODER_MODEL")
        name = "${SIEVE_CROSS_ENCODER_MODEL}"
        assert f"./models/{name}:/models/{name}:ro" in service["volumes"]
    from sieve_core.config import load_settings

    assert load_settings({"SIEVE_CROSS_ENCODER_MODEL": ""}).cross_encoder_model is None


def test_compose_is_safe_by_default() -> None:
    """Issue 16 item 9: loopback-only ports unless PUBLISH_HOST says otherwise, API keys required, Redis
    unpublished, Flower only in its profile and only with basic auth, the image's torch CPU-only."""
    services = _compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${PUBLISH_HOST:-127.0.0.1}:"), (
                f"{name} publishes {port} on every interface"
            )
    assert "ports" not in services["redis"]
    keys = services["server"]["environment"]["SIEVE_API_KEYS"]
    assert keys.startswith("${SIEVE_API_KEYS:?"), (
        "API keys must be required (compose refuses to start without)"
    )
    flower = services["flower"]
    assert flower["profiles"] == ["flower"]
    script = flower["command"][-1]
    assert 'test -n "$$FLOWER_BASIC_AUTH" ||' in script and "exit 1" in script
    assert '--basic-auth="$$FLOWER_BASIC_AUTH"' in script
    from flower.options import options  # the option the command passes exists in this Flower

    assert "basic_auth" in options
    docker = (ROOT / "Dockerfile").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu torch==" in docker
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and f"torch=={pinned.group(1)}" in docker, "the Dockerfile's torch differs from the pin"
