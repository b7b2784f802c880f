#!/usr/bin/env python3
"""Print the import cycles among the modules of excb/ and services/ and their count (issue 31).

Every import counts, function-local ones included (a local import that breaks a circle at run time still ties the
modules into one); imports under ``if TYPE_CHECKING:`` do not (they never run). ``from a.b import c`` is an edge
to the module ``a.b.c`` when that is a module, else to ``a.b``; a package's ``__init__`` is the module ``a.b``.
Each cycle printed is one strongly connected component of the graph (modules that all reach each other), with
one circular path through it as the example. Exit status 0; ``--fail`` makes it 1 when there is any cycle.

    python scripts/import_cycles.py [--fail]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("excb", "services")


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages (``pkg/__init__.py`` is ``pkg``)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: anywhere in the file, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _base(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out, key=lambda c: (-len(c), c))


def example_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest circular path from the component's first module back to itself (breadth first)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fail", action="store_true", help="exit 1 when there is any cycle")
    args = parser.parse_args(argv)
    modules = module_names()
    graph = edges(modules)
    found = cycles(graph)
    for i, comp in enumerate(found, 1):
        print(f"cycle {i} ({len(comp)} modules): {', '.join(comp)}")
        print(f"  e.g. {' -> '.join(example_path(graph, comp))}")
    print(f"import cycles in {', '.join(PACKAGES)}: {len(found)} "
          f"({len(modules)} modules, {sum(len(t) for t in graph.values())} import edges)")
    return 1 if args.fail and found else 0


if __name__ == "__main__":
    sys.exit(main())
