"""No import cycles inside the package.

The graph is built with ``ast`` from the sources (nothing is imported): one node per module of
``fastcnn`` -- every ``fastcnn/**/*.py``, plus the top-level ``kernels/`` folder, which is
installed as ``fastcnn.kernels`` -- and one edge per ``import`` / ``from ... import`` that
names another module of the package, relative imports included (``from . import x``,
``from ..recompute import y``). ``from P import name`` points at the submodule ``P.name``
when there is one, else at ``P`` itself. The implicit import of a module's parent packages
is not an edge.

Both kinds of import count:

* **module-level** imports (also inside ``if``/``try`` blocks and class bodies at module
  level: they run at import time) -- a cycle of these can fail with a partially initialised
  module, so :func:`test_no_import_cycle_at_module_level` allows none;
* **function-local** imports (inside a ``def`` or ``lambda``: they run when called) -- they
  cannot fail that way, but a cycle through them is still two modules that need each other;
  :func:`test_no_import_cycle_including_function_local_imports` allows none except the edges
  listed in :data:`KNOWN_LOCAL_EDGES`, each with its reason.

Imports under ``if TYPE_CHECKING:`` never run and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fastcnn"
#: source folder -> dotted package it is installed as
SOURCE_ROOTS = {ROOT / "fastcnn": "fastcnn", ROOT / "kernels": "fastcnn.kernels"}

#: function-local edges (importer, imported) that close a cycle today and why they are allowed.
#: The fix for each is in the importer (not in a file of the change that added this test).
KNOWN_LOCAL_EDGES: dict[tuple[str, str], str] = {}


def modules(roots=None) -> dict[str, Path]:
    """Dotted module name -> source file, for the package and its ``kernels`` mapping."""
    out = {}
    for src, dotted in (roots or SOURCE_ROOTS).items():
        for path in sorted(src.rglob("*.py")):
            rel = path.relative_to(src).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([dotted, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, function_local) for every import statement that runs at some point."""
    def walk(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk(ast.Module(body=[sub], type_ignores=[]), local)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            yield from walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                ast.Lambda)))
    yield from walk(tree, False)


def _resolve(name: str, mods) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in mods:
            return cand
        parts.pop()
    return None


def edges(roots=None) -> list[tuple[str, str, bool, int]]:
    """(importer, imported, function_local, line) for every intra-package import."""
    mods = modules(roots)
    out = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, local in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    if node.level - 1:
                        base = base[:-(node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                if t == PACKAGE or t.startswith(PACKAGE + "."):
                    r = _resolve(t, mods)
                    if r is not None and r != mod:
                        out.append((mod, r, local, node.lineno))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS, deterministic order)."""
    state = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def _graph(include_local: bool, allowed=()) -> tuple[dict[str, set[str]], dict]:
    graph, where = {}, {}
    for a, b, local, line in edges():
        if local and (not include_local or (a, b) in allowed):
            continue
        graph.setdefault(a, set()).add(b)
        where.setdefault((a, b), f"{a} -> {b} ({'function-local, ' if local else ''}line {line})")
    return graph, where


def _describe(cycle, where) -> str:
    return "import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(
        where[(a, b)] for a, b in zip(cycle, cycle[1:]))


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """On a small made-up package: relative imports of both levels, ``from . import module``,
    absolute imports, a folder mapped into the package, function-local and TYPE_CHECKING ones."""
    pkg, ext = tmp_path / "fastcnn", tmp_path / "kernels"
    (pkg / "sub").mkdir(parents=True)
    ext.mkdir()
    files = {
        pkg / "__init__.py": "from .a import f\n",
        pkg / "a.py": "from . import b\nimport fastcnn.sub.c\ndef f():\n    from .sub import d\n",
        pkg / "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nX = 1\n",
        pkg / "sub" / "__init__.py": "",
        pkg / "sub" / "c.py": "from ..b import X\nfrom .. import kernels\n",
        pkg / "sub" / "d.py": "",
        ext / "__init__.py": "",
        ext / "k.py": "from ..b import X\nfrom .utils import g\n",
        ext / "utils.py": "",
    }
    for path, text in files.items():
        path.write_text(text)
    found = {(a, b, local) for a, b, local, _ in edges({pkg: "fastcnn", ext: "fastcnn.kernels"})}
    assert found == {
        ("fastcnn", "fastcnn.a", False),
        ("fastcnn.a", "fastcnn.b", False),
        ("fastcnn.a", "fastcnn.sub.c", False),
        ("fastcnn.a", "fastcnn.sub.d", True),
        ("fastcnn.sub.c", "fastcnn.b", False),
        ("fastcnn.sub.c", "fastcnn.kernels", False),
        ("fastcnn.kernels.k", "fastcnn.b", False),
        ("fastcnn.kernels.k", "fastcnn.kernels.utils", False),
    }


def test_the_real_graph_is_not_empty():
    found = {(a, b) for a, b, _, _ in edges()}
    assert ("fastcnn.train", "fastcnn.cli") in found
    assert any(a.startswith("fastcnn.kernels.") for a, _ in found)  # kernels/ is part of the package


def test_the_cycle_finder_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_at_module_level():
    graph, where = _graph(include_local=False)
    cycle = find_cycle(graph)
    assert cycle is None, _describe(cycle, where)


def test_no_import_cycle_including_function_local_imports():
    graph, where = _graph(include_local=True, allowed=KNOWN_LOCAL_EDGES)
    cycle = find_cycle(graph)
    assert cycle is None, _describe(cycle, where)


def test_cli_evaluate_export_do_not_import_train():
    """The tools share fastcnn.cli; none of them needs the training engine."""
    for a, b, _, line in edges():
        if a in ("fastcnn.cli", "fastcnn.evaluate", "fastcnn.export", "fastcnn.runs", "fastcnn.distributed"):
            assert b != "fastcnn.train", f"{a} imports fastcnn.train (line {line})"
