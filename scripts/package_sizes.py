#!/usr/bin/env python3
"""Installed size of the Docker image's package sets, measured in this virtual environment (Docker cannot
run on the development machines): the runtime stage (`.[ops]` + the client) and the export stage
(`.[export]`, with torch). The figures the Dockerfile and the README's "Docker" section quote.

    .venv/bin/python scripts/package_sizes.py
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os

from packaging.requirements import Requirement

OWN = {"sieve-search", "sieve-client"}


def closure(roots: list[tuple[str, list[str]]]) -> dict[str, md.Distribution]:
    """Every installed distribution the roots need (their extras followed), by normalized name."""
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or [""])):
                continue
            todo.append((req.name, list(req.extras)))
    return seen


def size_mb(dist: md.Distribution) -> float:
    total = 0
    for file in dist.files or []:
        with contextlib.suppress(OSError):
            total += os.path.getsize(str(dist.locate_file(file)))
    return total / 1e6


def main() -> None:
    for label, extra in (("runtime stage (.[ops])", "ops"), ("export stage (.[export])", "export")):
        dists = closure([("sieve-search", [extra]), ("sieve-client", [])])
        sizes = sorted(((size_mb(d), k) for k, d in dists.items() if k not in OWN), reverse=True)
        top = ", ".join(f"{name} {mb:.0f}" for mb, name in sizes[:4])
        print(
            f"{label}: {sum(mb for mb, _ in sizes):.0f} MB installed in {len(sizes)} packages (largest: {top})"
        )
    print(f"torch here: {md.version('torch')}")


if __name__ == "__main__":
    main()
