"""The repository's import graph: no cycles, and services keep to their own folder.

Pure functions over source text so the rules can be tested on made-up trees. Every import
counts, also one inside a function (a cycle hidden behind a late import is still a cycle:
the two modules cannot be understood, tested or loaded apart); only imports under
`if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

FIRST_PARTY = ("services", "libs", "tools", "tests", "examples", "deploy")

# A service may import libs/, its own folder, the generated protos and this one shared
# client library (STYLE.md: "the geosteer client library is the one shared exception"),
# whose `geosteer_address` parser lives apart, without gRPC, for settings to validate.
SHARED_SERVICE_MODULES = ("services.geosteer.client", "services.geosteer.target")


def module_name(path: Path) -> str:
    """`services/relay/router.py` -> `services.relay.router`."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def imported_names(source: str, module: str) -> set[str]:
    """Dotted names a module imports (for `from a import b`: both `a` and `a.b`)."""
    names: set[str] = set()
    package = module.rpartition(".")[0]

    def visit(nodes: Iterable[ast.stmt | ast.expr | ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(source).body)
    return names


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """module -> the first-party modules of `sources` it imports."""
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        targets = {n for n in imported_names(source, module) if n in sources and n != module}
        graph[module] = targets
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    # Iterative, so a deep chain of imports cannot hit the recursion limit.
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def layering_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """`services.a.x imports services.b.y` lines for imports across service folders."""
    problems = []
    for module, targets in sorted(graph.items()):
        parts = module.split(".")
        if len(parts) < 3 or parts[0] != "services":
            continue
        own = ".".join(parts[:2]) + "."
        for target in sorted(targets):
            if not target.startswith("services.") or target.startswith(own):
                continue
            if target in SHARED_SERVICE_MODULES:
                continue
            problems.append(f"{module} imports {target}")
    return problems


def read_tree(root: Path, files: Iterable[str]) -> dict[str, str]:
    """module name -> source for the first-party Python files given relative to root."""
    sources = {}
    for rel in files:
        path = Path(rel)
        if path.suffix == ".py" and path.parts and path.parts[0] in FIRST_PARTY:
            sources[module_name(path)] = (root / path).read_text()
    return sources
