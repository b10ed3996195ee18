"""The shape of the code, read from its source: no import cycles, no module too long to read.

In-process and fast: every module of `upload_server/` and `workers/` is parsed with `ast`, never
imported. An import counts wherever it is written (at the top, under `if TYPE_CHECKING:`, inside a
function): each is a dependency of design. A package's `__init__` is a facade, not a node: an import
of a name it re-exports counts as an import of the module that defines it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("upload_server", "workers")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()
FACADES = {name for name, path in MODULES.items() if path.name == "__init__.py"}
TREES = {
    name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()
}


def _imports(module: str) -> Iterator[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import in `module`, absolute."""
    package = module if module in FACADES else module.rpartition(".")[0]
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level:
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                yield source, alias.name


def _targets(source: str, name: str | None, seen: frozenset[str] = frozenset()) -> set[str]:
    """The modules (never a facade) that importing `name` from `source` depends on."""
    if name is not None and f"{source}.{name}" in MODULES:
        source, name = f"{source}.{name}", None
    while source and source not in MODULES:  # `import a.b.c` of something not ours, or a name
        source = source.rpartition(".")[0]
    if not source or source in seen:
        return set()
    if source not in FACADES:
        return {source}
    seen |= {source}
    found: set[str] = set()
    for inner, inner_name in _imports(source):
        if name is None or inner_name == name:
            found |= _targets(inner, inner_name, seen)
    return found


def _graph() -> dict[str, set[str]]:
    return {
        module: {t for source, name in _imports(module) for t in _targets(source, name)} - {module}
        for module in MODULES
        if module not in FACADES
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, to print: a → b → … → a."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    for node in queue:
        for successor in sorted(graph[node] & component):
            if successor == start:
                return [*paths[node], start]
            if successor not in paths:
                paths[successor] = [*paths[node], successor]
                queue.append(successor)
    raise AssertionError("a strongly connected component without a cycle")


def _describe(cycles: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join("  " + " → ".join(cycle) for cycle in cycles)


def test_the_graph_sees_every_kind_of_import() -> None:
    """The reader itself: relative, absolute, TYPE_CHECKING and function-level imports, facades."""
    graph = _graph()
    assert "upload_server.errors" in graph["upload_server.service"]  # from . import errors
    assert "workers.pool" in graph["upload_server.service"]  # from workers.pool import …
    assert "upload_server.storage.local" in graph["upload_server.backends"]  # via the facade
    assert "upload_server.storage.s3" in graph["upload_server.backends"]  # inside a function
    assert not FACADES & set(graph)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, _describe(cycles)


def test_no_module_over_500_lines() -> None:
    long = {
        name: lines
        for name, path in MODULES.items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_writers_speak_domain_not_http() -> None:
    """`workers/` refuses with codes (`sessions.lifecycle.Refusal`); `api/refusals` alone turns
    them into statuses. So no module there imports the web layers or writes a status number."""
    web = ("falcon", "waitress", "upload_server.api", "upload_server.errors")
    for name, path in MODULES.items():
        if not name.startswith("workers"):
            continue
        imported = {f"{source}.{what}" if what else source for source, what in _imports(name)}
        assert not [m for m in imported if m.startswith(web)], name
        statuses = [
            node.lineno
            for node in ast.walk(TREES[name])
            if isinstance(node, ast.Constant)
            and type(node.value) is int
            and 400 <= node.value < 600
        ]
        assert not statuses, f"{path}: HTTP-like status numbers on lines {statuses}"
