"""The project's modules import one way: no circles, function-level imports included (DESIGN.md: a name used by two
modules lives below both)."""

from __future__ import annotations

import ast
import re
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


def imports_of_tests(path: Path) -> list[str]:
    """The `tests` modules a script file imports: in its code, in the Python it hands to another interpreter as a
    string (`python -c CODE`) and, for a shell script, in its text."""
    text = path.read_text(errors="replace")
    if path.suffix != ".py":
        return re.findall(r"(?:from|import)\s+(tests\b[\w.]*)", text)
    found, trees = [], [ast.parse(text)]
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.append(node.module or "")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
                try:
                    trees.append(ast.parse(node.value))
                except SyntaxError:  # text, not code
                    pass
    return [name for name in found if name == "tests" or name.startswith("tests.")]


def test_no_script_imports_tests():
    """Scripts (benchmarks, the device kit) run where tests/ is not: what they share with tests lives in flux/fakes/
    or script/, and tests import it from there."""
    scripts = [p for p in sorted((ROOT / "script").rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    assert len(scripts) > 30 and any(p.name == "benchmark.py" for p in scripts)
    found = {str(p.relative_to(ROOT)): names for p in scripts if (names := imports_of_tests(p))}
    assert not found, f"scripts importing tests: {found}"


def test_the_script_check_finds_tests_imported_in_code_in_strings_and_in_shell(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from tests.helpers import http\n")
    (tmp_path / "b.py").write_text('CODE = "import flux, tests.helpers.loras; print(1)"\nTEXT = "import this: tests"\n')
    (tmp_path / "c").write_text('#!/usr/bin/env bash\n"$PY" -c "from tests.helpers.inputs import defaults"\n')
    (tmp_path / "d.py").write_text("import testsuite\nfrom .tests import x\n")
    assert [imports_of_tests(tmp_path / n) for n in ("a.py", "b.py", "c", "d.py")] == [
        ["tests.helpers"], ["tests.helpers.loras"], ["tests.helpers.inputs"], []]


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
