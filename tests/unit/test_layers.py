"""The house rules, checked on the source: layers import only downward, the server never imports the
workers package, and no module imports another that (directly or not) imports it back.

Imports are read with `ast` from every module of our packages, including imports inside functions
(a deferred import is still a dependency); only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sieve_core", "server", "workers", "sieve_cli")

# Who may import whom. A module's layer is the longest prefix listed here; it may import its own layer
# and the layers listed for it, nothing else of ours.
LAYERS: dict[str, set[str]] = {
    "sieve_core": set(),
    "server.storage": {"sieve_core"},
    "server.dispatch": {"sieve_core"},
    "server.core": {"sieve_core", "server.storage", "server.dispatch"},
    "server.jobs": {"sieve_core", "server.core", "server.storage", "server.dispatch"},
    "server.transport": {"sieve_core", "server.core", "server.jobs"},
    "server.app": {"sieve_core", "server.core", "server.jobs", "server.transport", "server.storage"},
    "workers": {"sieve_core"},
    "sieve_cli": {"sieve_core", "server.app"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from pkg import mod` imports pkg.mod when that is a module of ours
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        raw = _imports(tree, name, path.name == "__init__.py")
        graph[name] = {m for m in raw if m in modules and m != name}
    return graph


def _layer(module: str) -> str:
    best = ""
    for layer in LAYERS:
        if (module == layer or module.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best


def test_every_module_has_a_layer() -> None:
    assert [m for m in _graph() if not _layer(m) and m != "server"] == []


def test_layers_import_only_downward() -> None:
    wrong = []
    for module, imported in _graph().items():
        own = _layer(module)
        allowed = LAYERS.get(own, set()) | {own}
        for target in imported:
            if target in PACKAGES:  # a package's __init__ (empty)
                continue
            if _layer(target) not in allowed:
                wrong.append(f"{module} ({own}) imports {target} ({_layer(target)})")
    assert wrong == []


def test_the_server_never_imports_the_workers_package() -> None:
    offenders = {m: sorted(t for t in imp if t.startswith("workers")) for m, imp in _graph().items()}
    assert {m: t for m, t in offenders.items() if m.startswith(("server", "sieve_core")) and t} == {}


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_a_cycle_is_detected() -> None:
    """The checker itself: a planted two-module cycle in a scratch package is found."""
    tree_a = ast.parse("from pkg import b\n")
    tree_b = ast.parse("def f():\n    import pkg.a\n")
    assert "pkg.b" in _imports(tree_a, "pkg.a", False)
    assert "pkg.a" in _imports(tree_b, "pkg.b", False)


@pytest.mark.parametrize("entry", ["server.app", "sieve_cli.main"])
def test_server_process_loads_no_worker_code(entry: str) -> None:
    """At run time too: importing the server (or the CLI) leaves `workers` out of sys.modules."""
    code = (
        f"import sys, importlib; importlib.import_module({entry!r}); "
        "print(sorted(m for m in sys.modules if m == 'workers' or m.startswith('workers.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
