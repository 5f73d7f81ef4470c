"""The import graph of `nsa_impl`: no cycle, and nothing in ``kernels/`` imports upward.

Read from the source with `ast` (every ``import`` statement, module level or inside a function,
relative imports resolved), so a lazy import cannot hide a cycle or an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nsa_impl

ROOT = Path(nsa_impl.__file__).resolve().parent
PKG = "nsa_impl"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, modules) -> list[str]:
    """Absolute module names an ``ImportFrom`` depends on: each imported name that is a module
    (``from . import dispatch``), and the source module itself when a name is an attribute of it
    (``from .plan import Plan``, ``from nsa_impl import nsa_attention``)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    subs = [f"{target}.{alias.name}" for alias in node.names]
    found = [s for s in subs if s in modules]
    return found + ([target] if len(found) < len(subs) else [])


def import_graph() -> dict[str, set[str]]:
    """``module -> nsa_impl modules it imports`` for every module of the package."""
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                targets.update(_resolve(name, is_package, node, modules))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, f"import cycles in nsa_impl: {cycles}"


def test_kernels_import_nothing_above_them():
    graph = import_graph()
    upward = {
        m: sorted(t for t in ts if not t.startswith(f"{PKG}.kernels"))
        for m, ts in graph.items()
        if m.startswith(f"{PKG}.kernels")
    }
    upward = {m: ts for m, ts in upward.items() if ts}
    assert not upward, f"kernels/ imports upward: {upward}"


def test_the_graph_sees_lazy_and_relative_imports():
    """The walker itself: relative, nested and lazy imports are all edges."""
    graph = import_graph()
    assert f"{PKG}.dispatch" in graph[f"{PKG}.plan"]  # from . import dispatch
    assert f"{PKG}.kernels.flash" in graph[f"{PKG}.branches.sliding"]  # from ..kernels import
    assert f"{PKG}.api" in graph[f"{PKG}.decode"]  # the lazy import inside a function
    assert f"{PKG}.plan" in graph[f"{PKG}.api"] and PKG not in graph[f"{PKG}.plan"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
