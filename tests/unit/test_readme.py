"""The README's claims that a program can check (issue 16 item 7): every `sieve` command in its shell blocks
parses with the real parser, every `make` target exists, its Python blocks compile and import only what the
`sieve` package has, its links to sections and the compose file's references land on real headings, and
the repository paths and modules it names exist. tests/system/test_newcomer.py runs the Python client
block against a live server."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import sieve

from sieve_cli.main import build_parser
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
TOPS = (
    "bench/",
    "tests/",
    "server/",
    "sieve_core/",
    "sieve_cli/",
    "workers/",
    "clients/",
    "scripts/",
    "examples/",
)


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def shell_commands() -> list[list[str]]:
    """Each command of the bash/sh blocks, continuation lines joined, comments and env assignments dropped."""
    commands = []
    for block in blocks("bash") + blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            try:
                words = shlex.split(line)
            except ValueError:  # e.g. grpcurl's JSON with quotes shlex does not take: not a sieve command
                words = line.split()
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)
            if words:
                commands.append(words)
    return commands


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


PROSE = re.sub(r"^```.*?^```", "", README, flags=re.M | re.S)  # without code blocks (their # comments)
HEADINGS = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", PROSE, re.M)}


def test_every_sieve_command_in_the_shell_blocks_parses() -> None:
    commands = [c for c in shell_commands() if c[0] in ("sieve", ".venv/bin/sieve")]
    assert len(commands) >= 5
    for argv in commands:
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"README: `{shlex.join(argv)}` does not parse (exit {exc.code})")


def test_every_make_target_in_the_readme_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = {c[1] for c in shell_commands() if c[0] == "make" and len(c) > 1}
    named |= set(re.findall(r"`make ([\w-]+)", README))
    assert named and named <= targets, sorted(named - targets)


def test_python_blocks_compile_and_import_what_sieve_has() -> None:
    code = blocks("python")
    assert code
    for block in code:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "sieve":
                for alias in node.names:
                    assert hasattr(sieve, alias.name), (
                        f"README imports sieve.{alias.name}, which does not exist"
                    )


def test_links_to_sections_land_on_headings() -> None:
    anchors = set(re.findall(r"\]\(#([\w-]+)\)", README))
    assert anchors and anchors <= HEADINGS, sorted(anchors - HEADINGS)


def test_compose_files_refer_to_sections_that_exist() -> None:
    refs = 0
    for name in ("docker-compose.yml", "docker-compose.cross-encoder.yml"):
        text = (ROOT / name).read_text()
        for ref in re.findall(r'README: "([^"]+)"', text):
            refs += 1
            assert slug(ref) in HEADINGS, f"{name} points to README section {ref!r}, which does not exist"
    assert refs >= 3


def test_repository_paths_and_modules_named_exist() -> None:
    # The results block is written by bench/report.py (its wording is the benchmarks' to keep).
    outside_results = re.sub(r"<!-- results:start.*?<!-- results:end -->", "", README, flags=re.S)
    pattern = r"(?<![\w./-])((?:" + "|".join(map(re.escape, TOPS)) + r")[\w./-]*)"
    for path in set(re.findall(pattern, README)):
        path = path.rstrip(".,:;)").split("::")[0]
        if path != "docs/s":  # "docs/s", a rate
            assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    for module in set(
        re.findall(r"\b((?:server|sieve_core|sieve_cli|workers)(?:\.[a-z_]+)+)", outside_results)
    ):
        parts = module.split(".")
        found = any(
            (ROOT / Path(*parts[:n])).with_suffix(".py").is_file() or (ROOT / Path(*parts[:n])).is_dir()
            for n in range(len(parts), 1, -1)
        )
        assert found, f"README names the module {module}, which does not exist"


def test_typescript_client_is_shown_with_its_address_first() -> None:
    assert "new SieveClient({" not in README  # the constructor is (address, options)
    assert "new SieveClient(address, { apiKey })" in README
