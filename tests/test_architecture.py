"""The package's shape: no import cycle between the modules of pccfast/ (a cycle makes the
import order matter and the layers unreadable: issue 15)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pccfast"
# Compiled extensions (setup.py): modules without Python source, importing nothing of ours.
EXTENSIONS = {"pccfast._C"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The pccfast modules ``path`` imports, at module level or inside functions (every
    ``import`` statement counts), relative imports resolved; ``from pkg import sub`` names the
    submodule when ``sub`` is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c: the deepest module known
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths) | EXTENSIONS
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles in pccfast/: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles():
    """The check can fail: a cycle through relative and function-level imports is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_level_imports_are_resolved(tmp_path):
    package = tmp_path / "pccfast"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "x.py").write_text("def f():\n    from .sub import y\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "y.py").write_text("from .. import x\nfrom ..sub.y import z\n")
    modules = {"pccfast", "pccfast.x", "pccfast.sub", "pccfast.sub.y"}
    assert _imports(package / "x.py", "pccfast.x", modules) == {"pccfast.sub.y"}
    assert _imports(package / "sub" / "y.py", "pccfast.sub.y", modules) == {"pccfast.x"}


def test_pccfast_prune_calls_the_pruner_and_reads_the_package():
    """``pccfast.prune(...)`` and ``pccfast.prune.CIImportance`` work without swapping the
    package's module class."""
    import sys
    import types

    import pccfast
    import pccfast.prune.pruner
    from pccfast.prune import CIImportance, Plan

    package = sys.modules["pccfast.prune"]
    assert type(package) is types.ModuleType
    assert pccfast.prune.CIImportance is CIImportance and pccfast.prune.Plan is Plan
    assert pccfast.prune.graph is sys.modules["pccfast.prune.graph"]
    assert "build_graph" in dir(pccfast.prune)
    calls = []
    real = pccfast.prune.pruner.prune
    try:
        pccfast.prune.pruner.prune = lambda *a, **k: calls.append((a, k)) or "pruned"
        assert pccfast.prune("model", "scores", rates=0.5) == "pruned"
    finally:
        pccfast.prune.pruner.prune = real
    assert calls == [(("model", "scores"), {"rates": 0.5})]
