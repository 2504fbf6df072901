#!/usr/bin/env python3
"""Keep the README's settings table in step with sieve_core/config.py (the one source of truth).

python scripts/gen_docs.py           # rewrite the table between the markers
python scripts/gen_docs.py --check   # exit 1 if the README's table is stale (tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sieve_core.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin (scripts/gen_docs.py) -->", "<!-- settings:end -->"


def markdown_table() -> str:
    """The settings as the README's Markdown table ."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else str(field.default)
        rows.append(f"| `SIEVE_{name.upper()}` | `{cell(default)}` | {cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    return f"{head}{BEGIN}\n{markdown_table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print("README.md's settings table is stale: run `python scripts/gen_docs.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
