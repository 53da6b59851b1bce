"""The project's modules import one way: no circles, function-level imports included (DESIGN.md: a name used by two
modules lives below both)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


def project_modules() -> dict[str, Path]:
    """Every module of the product by its dotted name: predict.py, lora_loader.py and everything under flux/."""
    found = {}
    for path in [ROOT / "predict.py", ROOT / "lora_loader.py", *sorted((ROOT / "flux").rglob("*.py"))]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a module imports, anywhere in it (top level, functions, methods)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from . import x` imports the module x; `from .x import y` the module x
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {m for m in found if m in modules and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_circles_among_the_projects_modules():
    modules = project_modules()
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    assert len(modules) > 30 and graph["flux.engine.build"]  # it found the modules and their imports
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(
        " <-> ".join(f"{m} imports {sorted(graph[m] & set(group))}" for m in group) for group in found)


def test_the_walk_finds_a_circle_through_a_function_level_import(tmp_path):
    """The check itself: two modules that import each other, one of them inside a function, are a circle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert circles({n: imports(n, p, modules) for n, p in modules.items()}) == [["a", "b"]]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_lora_package_does_not_reach_up_to_the_weights_sources():
    """LoRAs and model weights are both sources (one layer): flux/lora/ uses what lies below, never flux.weights (which
    brings the variant table, the tiny-model builders and tarstream with it)."""
    modules = project_modules()
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    lora = [m for m in modules if m == "flux.lora" or m.startswith("flux.lora.")]
    assert "flux.lora.sources" in lora
    reaching = {m: sorted(reachable(graph, m) & {"flux.weights", "flux.engine"}) for m in lora}
    assert not any(reaching.values()), reaching
