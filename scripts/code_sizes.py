"""Print the largest production modules and classes (lines; methods for classes), biggest first.

    python scripts/code_sizes.py [--top N]

The issue-12 limits: no class much over 250 lines, no production module over 400. Reads the server,
sieve_core, workers and sieve_cli packages (the torch-only exporters included); clients and tests are not read.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "sieve_core", "workers", "sieve_cli")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    modules: list[tuple[int, str]] = []
    classes: list[tuple[int, int, str]] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            name = str(path.relative_to(ROOT))
            modules.append((len(text.splitlines()), name))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                    methods = sum(isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef) for b in node.body)
                    classes.append((node.end_lineno - node.lineno + 1, methods, f"{name}:{node.name}"))
    print("modules (lines)")
    for lines, name in sorted(modules, reverse=True)[: args.top]:
        print(f"  {lines:5d}  {name}")
    print("classes (lines, methods)")
    for lines, methods, name in sorted(classes, reverse=True)[: args.top]:
        print(f"  {lines:5d} {methods:3d}  {name}")


if __name__ == "__main__":
    main()
