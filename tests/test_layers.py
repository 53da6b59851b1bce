"""The layers point down and the engine reads as stages (DESIGN.md, "What the third review taught"): settings imports
nothing above the small services, memory no optimization, the output stage nothing of the engine (LAYERS, written once
here); the engine reads no optimization switch by name (flux/speed's `optimize` runs them) and holds no function over
60 lines; no product module is over 400 lines, no script over 500."""

from __future__ import annotations

import ast

from flux import switches
from tests.conftest import ROOT
from tests.test_imports import imports, project_modules


# The layers, bottom up (DESIGN.md, "What the third review taught"): a module imports only from its own layer or
# below, anywhere in it (function-level imports included). A module is in the layer of its longest listed prefix.
LAYERS = (
    ("facts", ("flux", "flux.errors", "flux.logs", "flux.folders", "flux.variants", "flux.switches", "flux.limits")),
    ("services", ("flux.settings", "flux.netguard", "flux.cache", "flux.sizes", "flux.images", "flux.progress",
                  "flux.gpu", "flux.budget", "flux.response")),
    ("mechanisms", ("flux.download", "flux.tarstream", "flux.memory", "flux.speed", "flux.compiler", "flux.safety",
                    "flux.fakes", "flux.residency", "flux.hostmemory", "flux.bfl")),
    ("sources", ("flux.weights", "flux.singlefile", "flux.survey", "flux.lora", "lora_loader", "flux.compile_cache")),
    ("request", ("flux.request", "flux.prediction")),
    ("engine", ("flux.engine",)),
    ("output", ("flux.output",)),
    ("predict", ("predict",)),
)


def layer_of(module: str) -> int | None:
    found = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    return max(found)[1] if found else None


def test_every_module_has_a_layer_and_none_imports_a_higher_one():
    modules = project_modules()
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, path in sorted(modules.items()) for t in sorted(imports(m, path, modules))
              if layer_of(t) > layer_of(m)]
    assert not upward, "imports that point up: " + "; ".join(upward)
    assert layer_of("flux.lora.sources") == 3 and layer_of("flux") == 0  # the longest prefix decides


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



def test_no_module_of_the_product_is_over_400_lines_and_no_script_over_500():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sorted((ROOT / "flux").rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 400]
    big += [f"{p.relative_to(ROOT)} ({n} lines)" for p in sorted((ROOT / "script").rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and (n := len(p.read_text().splitlines())) > 500]
    assert not big, big


def _bound_methods_passed(path) -> list[str]:
    """Each call in a module that hands on a bound method of the class it is in (`f(self.method)`, `f(x=self.method)`):
    a callback into that object for whoever receives it."""
    found = []
    for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
        methods = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call)):
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                if (isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "self"
                        and arg.attr in methods):
                    found.append(f"{path.name}:{call.lineno} {cls.name}.{arg.attr} handed to {ast.unparse(call.func)}")
    return found


def test_the_engine_hands_no_bound_method_of_its_own_down():
    """A callback from a lower layer into the engine is an upward import in disguise (DESIGN.md): the memory layer
    is asked (flux/hostmemory.py), and the engine does what it answers."""
    found = [f for path in sorted((ROOT / "flux" / "engine").glob("*.py")) for f in _bound_methods_passed(path)]
    assert not found, found


def test_only_the_runner_routes_a_request():
    """Routing (the fp8 copy where the plan keeps the bf16 one off the GPU) happens in the runner's two entry points,
    a run's stage 1 and the benchmark's LoRA switch, and nowhere else in the product."""
    calls = []
    for path in sorted((ROOT / "flux").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            calls += [f"{path.relative_to(ROOT)}:{fn.name}" for n in ast.walk(fn)
                      if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "route"]
    assert sorted(calls) == ["flux/engine/run.py:prepare_loras", "flux/engine/run.py:run"], calls
