#!/usr/bin/env python3
"""Generate the asyncio Python client (clients/python/sieve/aio.py and sieve/_async/) from the blocking one
(client.py and sieve/_sync/), file by file.

The two clients have the same methods, deadlines, retries and errors; keeping them parallel by hand let
them drift. So `AsyncSieveClient` and its parts are written by this script from the sync sources with a few
plain textual rules (the way qdrant-client generates its async client from the sync one), and `--check`, run
by tests/unit/test_async_client.py, fails when a generated file is not what its source generates.

    python scripts/gen_async_client.py           # regenerate after editing client.py or sieve/_sync/
    python scripts/gen_async_client.py --check   # exit 1 with a diff if a generated file is stale

Textual rules rather than an AST rewrite: they keep comments (and `type: ignore`s) where they were. Every
rule must apply at least once somewhere and nothing blocking may be left over, or the script stops and says
which; client.py's docstring says how to write code the rules understand. Imports the async code no longer
needs are dropped by ruff (F401, import order), then it is formatted as every file here.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "python" / "sieve"
PARTS = ("__init__", "base", "collection", "document", "search", "job")
# (sync source, async file), relative to the package.
FILES = [(f"_sync/{part}.py", f"_async/{part}.py") for part in PARTS] + [("client.py", "aio.py")]

AIO_DOC = '''\
"""AsyncSieveClient: the asyncio client, with the same methods, deadlines, retries and errors as
`SieveClient` (see `sieve.client`), as coroutines; `watch_job` and `search_stream` are async iterators.

    async with AsyncSieveClient("127.0.0.1:50051") as client:
        response = await client.search("notes", "a cat")
        async for job in client.watch_job(job_id):
            print(job.done, job.total)

Create it inside the running event loop that uses it (grpc.aio channels belong to one loop). Upload
sources are read in the event loop's thread between sends.
"""'''
NOQA = """
# `timeout=` is the gRPC deadline, sent to the server with the call (grpc-timeout) so that the server
# bounds its own work by it; asyncio.timeout() would only stop waiting here.
# ruff: noqa: ASYNC109
"""
CLASSES = r"\b(ClientBase|CollectionCalls|DocumentCalls|SearchCalls|JobCalls|SieveClient)\b"

# (pattern, replacement), applied in order to each sync source below its module docstring.
RULES: list[tuple[str, str]] = [
    (r"^from sieve\._sync\.(\w+) import", r"from sieve._async.\1 import"),
    (CLASSES, r"Async\1"),
    (r'"""A blocking client for a Sieve server', '"""An asyncio client for a Sieve server'),
    (r"^import time$", "import asyncio\nimport time"),
    (r"^from collections\.abc import ", "from collections.abc import AsyncIterator, Awaitable, "),
    (r"^    def __enter__\(", "    async def __aenter__("),
    (r"^    def __exit__\(", "    async def __aexit__("),
    (r"^    def (?!__)(\w+)\(", r"    async def \1("),
    (r"\bgrpc\.(insecure_channel|secure_channel|Channel)\b", r"grpc.aio.\1"),
    (r"\bself\._unary\(", "await self._unary("),
    (r"\bself\.channel\.close\(\)", "await self.channel.close()"),
    (r"\bself\.close\(\)", "await self.close()"),
    (r"\bCallable\[\.\.\., T\]", "Callable[..., Awaitable[T]]"),
    (r"\breturn call\(", "return await call("),
    (r"\btime\.sleep\(", "await asyncio.sleep("),
    (r"= self\._jobs\.UploadIndexJob\(", "= await self._jobs.UploadIndexJob("),
    (r"^(\s+)for message in ", r"\1async for message in "),
    (r"^(\s+)yield from (self\._stream\(.*\))$", r"\1async for message in \2:\n\1    yield message"),
    (r"-> Iterator\[", "-> AsyncIterator["),
]
# What must not be left in the async code: blocking calls and sync definitions.
LEFTOVERS = [
    r"^    def (?!__init__)\w+\(",
    r"\btime\.sleep\(",
    r"(?<!await )\bself\._unary\(",
    r"\bgrpc\.(insecure_channel|secure_channel)\(",
    r"-> Iterator\[",
    r"^\s+for message in ",
    r"\byield from\b",
    r"\bsieve\._sync\b",
]
_DOCSTRING = re.compile(r'\A"""(.*?)"""\n', re.S)


def generate() -> dict[Path, str]:
    """The generated files' contents, by path."""
    used = dict.fromkeys(pattern for pattern, _ in RULES)
    out: dict[Path, str] = {}
    for source, target in FILES:
        text = (PACKAGE / source).read_text(encoding="utf-8")
        doc = _DOCSTRING.match(text)
        if doc is None:
            raise SystemExit(f"gen_async_client: {source} does not start with a docstring")
        body = text[doc.end() :]
        for pattern, replacement in RULES:
            body, count = re.subn(pattern, replacement, body, flags=re.M)
            if count:
                used.pop(pattern, None)
        for pattern in LEFTOVERS:
            found = re.search(pattern, body, re.M)
            if found:
                line = body.count("\n", 0, found.start()) + 1
                raise SystemExit(f"gen_async_client: {found.group(0)!r} left at line {line} of {target}")
        header = f"# Generated by scripts/gen_async_client.py from sieve/{source}. DO NOT EDIT: edit that file and rerun.\n"
        docstring = (
            AIO_DOC if target == "aio.py" else f'"""The asyncio twin of sieve/{source} (see there)."""'
        )
        out[PACKAGE / target] = _tidy(PACKAGE / target, header + docstring + "\n" + NOQA + body)
    if used:
        raise SystemExit(f"gen_async_client: rules matched nothing: {list(used)}")
    return out


def _ruff(args: list[str], path: Path, code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--stdin-filename", str(path), "-"],
        input=code,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"gen_async_client: ruff {args[0]} failed on {path.name}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def _tidy(path: Path, code: str) -> str:
    """Unused imports dropped and imports sorted (ruff check --fix), then ruff format."""
    # `sieve` named first-party: ruff would otherwise decide from whether the target folder exists yet.
    isort = ["--config", "lint.isort.known-first-party = ['sieve']"]
    fixed = _ruff(["check", "--fix", "--select", "F401,I", "--quiet", "--exit-zero", *isort], path, code)
    return _ruff(["format"], path, fixed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated file differs from what is generated"
    )
    args = parser.parse_args(argv)
    stale = 0
    for path, code in generate().items():
        if not args.check:
            path.parent.mkdir(exist_ok=True)
            path.write_text(code, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
            continue
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != code:
            stale += 1
            name = str(path.relative_to(PACKAGE))
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                code.splitlines(keepends=True),
                f"{name} (committed)",
                f"{name} (generated)",
            )
            sys.stderr.write("".join(diff))
    if stale:
        sys.stderr.write(
            f"{stale} generated client file(s) stale: run `python scripts/gen_async_client.py`\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
