"""The service's modules import, and import each other without a cycle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"


def _name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(SERVICE.rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """The service modules a module imports, function bodies and imports for
    type checkers included: an import moved into a function still closes a
    cycle, only later, and one hidden behind TYPE_CHECKING is a dependency
    all the same."""

    def __init__(self, name: str, path: Path) -> None:
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.found: set[str] = set()

    def visit_Import(self, node: ast.Import) -> None:
        self.found |= {alias.name for alias in node.names if alias.name in MODULES}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.package.rsplit(".", node.level - 1)[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            # `from . import web` imports a module; `from .app import create_app` a name.
            if f"{base}.{alias.name}" in MODULES:
                self.found.add(f"{base}.{alias.name}")
            elif base in MODULES:
                self.found.add(base)


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        visitor = _Imports(name, path)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        graph[name] = visitor.found - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        for imported in sorted(graph[name]):
            if cycle := visit(imported, [*path, name]):
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        if cycle := visit(name, []):
            return cycle
    return None


def test_every_service_module_imports():
    # service.__main__ runs the command when imported.
    for name in MODULES.keys() - {"service.__main__"}:
        importlib.import_module(name)


def test_no_import_cycle_among_service_modules():
    graph = _graph()
    assert graph["service.cli"] >= {"service.app", "service.web"}, "the parser misses imports"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_service_module_is_over_600_lines():
    longer = {name: lines for name, path in MODULES.items() if (lines := len(path.read_text().splitlines())) > 600}
    assert longer == {}


def test_the_top_folder_holds_at_most_12_modules():
    # The rest lives in packages named for their role (domain, store, runtime, ...).
    top = sorted(path.name for path in SERVICE.glob("*.py"))
    assert len(top) <= 12, top
