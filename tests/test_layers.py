"""The layers point down and the engine reads as stages (DESIGN.md, "What the third review taught"): settings imports
nothing above the small services, memory no optimization, the output stage nothing of the engine; the engine reads
no optimization switch by name (flux/speed's `optimize` runs them) and holds no function over 60 lines."""

from __future__ import annotations

import ast

from flux import switches
from tests.conftest import ROOT
from tests.test_imports import imports, project_modules


def test_settings_memory_and_output_import_only_what_lies_below_them():
    modules = project_modules()
    above = {
        "flux.settings": ("flux.memory", "flux.speed", "flux.compiler", "flux.engine", "flux.weights", "flux.lora"),
        "flux.memory": ("flux.speed", "flux.engine", "flux.compiler"),
        "flux.output": ("flux.engine",),
    }
    for name, forbidden in above.items():
        found = sorted(m for m in imports(name, modules[name], modules) if m.startswith(forbidden))
        assert not found, f"{name} imports {found}, above it"


def test_the_engine_reads_no_switch_by_name():
    names = {s.name for s in switches.SETTINGS}
    found = []
    for path in sorted((ROOT / "flux" / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, (ast.Name, ast.Attribute)):
                value = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                if value == "settings":
                    found.append(f"{path.name}:{node.lineno} settings.{node.attr}")
    assert not found, found


def test_no_function_in_the_engine_is_over_60_lines():
    long = [f"{path.name}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / "flux" / "engine").glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long
