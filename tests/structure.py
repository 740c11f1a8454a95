"""The import edges between vlpipe's rooms (packages and their subpackages), read with ``ast``.

``python -m tests.structure`` prints them; ``tests/test_structure.py`` checks them.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("operators", "pipelines", "jobs")


def modules() -> dict[str, Path]:
    """Every module of the installed packages, by dotted name."""
    found = {}
    for top in TOPS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def room(module: str) -> str:
    """A module's room: its subpackage (``pipelines.execute``), or the module itself on a package's ground
    floor (``pipelines.config``, ``pipelines.run``)."""
    return ".".join(module.split(".")[:2])


def imports(path: Path, tops: tuple[str, ...] = TOPS) -> set[str]:
    """The modules of the packages ``tops`` that ``path`` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in names if name.split(".")[0] in tops}


def room_edges() -> dict[tuple[str, str], int]:
    """(room, room it imports) -> how many imports, between different rooms."""
    known = modules()
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for module, path in known.items():
        for name in imports(path):
            while name not in known and "." in name:
                name = name.rpartition(".")[0]
            if name in known and room(name) != room(module):
                edges[(room(module), room(name))] += 1
    return dict(edges)


def circles(edges) -> list[list[str]]:
    """Rooms that import each other, directly or around a loop (strongly connected components)."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def functions_over(limit: int) -> list[tuple[int, str]]:
    """(lines, where) of every function longer than ``limit`` lines, longest first."""
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    long.append((length, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(long, reverse=True)


def main() -> int:
    edges = room_edges()
    for (a, b), count in sorted(edges.items()):
        print(f"{a:<20} -> {b:<20} {count}")
    found = circles(edges)
    print(
        f"{len({r for e in edges for r in e})} rooms, {len(edges)} edges, "
        + (f"circles: {found}" if found else "no circle")
    )
    longest = functions_over(0)[:3]
    print("longest functions: " + ", ".join(f"{where} ({n} lines)" for n, where in longest))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
