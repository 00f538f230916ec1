"""Every module of the package imports, and no two package modules import each other.

The import graph is read from the source (``ast``): every ``import``, at module level or inside a
function, is an edge, since a lazy import only hides a cycle until the function runs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "stackrec_dist"
ROOT = Path(__file__).resolve().parents[1]

# Edges of a cycle still being taken apart, each with who removes it. An edge listed here that the
# source no longer has fails the test, so the list only shrinks.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package's ``__init__`` counts as the package)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module name
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "stackrec_dist.data.split_reader" in graph["stackrec_dist.data.stream"]  # `from .split_reader import`
    assert "stackrec_dist.console" in graph["stackrec_dist.cli"]
    assert "stackrec_dist.launch.submit" in graph["stackrec_dist.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_package_modules():
    graph = import_graph()
    for src, dst in KNOWN_CYCLE_EDGES:
        assert dst in graph[src], f"{src} no longer imports {dst}: remove it from KNOWN_CYCLE_EDGES"
        graph[src].discard(dst)
    assert cycles(graph) == []


def test_every_module_imports_in_a_fresh_interpreter():
    """One child interpreter imports every module, dependencies first (a broken or
    side-effecting import fails here, not as a skip elsewhere)."""
    graph = import_graph()
    order: list[str] = []

    def add(m: str, seen: set[str]) -> None:
        if m in order or m in seen:
            return
        seen.add(m)
        for dep in sorted(graph[m]):
            add(dep, seen)
        order.append(m)

    for m in sorted(graph):
        add(m, set())
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
