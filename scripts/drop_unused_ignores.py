"""Remove the `# type: ignore[...]` comments that mypy reports as unused (warn_unused_ignores).

Usage: .venv/bin/mypy | python scripts/drop_unused_ignores.py   (then run mypy again)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: Unused \"type: ignore")
IGNORE = re.compile(r"\s*# type: ignore(\[[^\]]*\])?")


def main() -> int:
    edits: dict[str, set[int]] = {}
    for row in sys.stdin:
        match = LINE.match(row)
        if match:
            edits.setdefault(match["path"], set()).add(int(match["line"]))
    for path, lines in edits.items():
        source = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
        for number in lines:
            source[number - 1] = IGNORE.sub("", source[number - 1], count=1)
        Path(path).write_text("".join(source), encoding="utf-8")
        print(f"{path}: {len(lines)} unused ignores removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
