"""The product with only the container's packages importable: a second environment made by subtraction.

    python -m tests.helpers.runtime_only SPEC.json     (from the repository root)

SPEC.json: {"allowed": [distribution names], "cases": [[name, {input: value}], ...], "files": [input names whose
values are local paths]}; each such file is delivered the way the cog server delivers a caller's file: sent as a
data: URI, fetched by cog's own URLPath.convert into its temporary file, deleted after the case. Before anything else
is imported, every distribution installed here that is not in "allowed" is hidden: its top-level modules cannot be found (an import of one fails as if it were not installed) and
importlib.metadata does not list it (so the libraries' "is X available" checks answer as in the container). Then the
real Predictor is set up (the tiny FLUX, from FLUX_WEIGHTS / FLUX_WEIGHTS_DIR) and predict() runs every case. The last
line printed is a JSON report: each case's outputs and metrics, the hidden modules something asked for, and the
repository's files the product imported (they must go into the image: .dockerignore).

`allowed` is what the container holds: requirements.txt, cog.yaml's `run:` pins and cog's SDK
(`runtime_distributions`). A module that only requirements-dev.txt provides makes the run fail, which is the point.
"""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.metadata
import json
import mimetypes
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions(root: Path = ROOT) -> set[str]:
    """The distributions the container installs: requirements.txt's pins, cog.yaml's `run:` pins (both read by
    script/image_pins.py) and cog's SDK (cog.yaml's sdk_version: cog and coglet with what they require, as installed
    here)."""
    from packaging.requirements import Requirement

    sys.path.insert(0, str(root / "script"))
    import image_pins

    names = set(image_pins.image_pins(root))
    todo = ["cog", "coglet"]
    while todo:
        name = canonical(todo.pop())
        if name in names:
            continue
        names.add(name)
        for req in importlib.metadata.requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return names


def build_context_filter(dockerignore: str):
    """A function telling whether a path (relative to the repository) goes into the image's build context under
    these .dockerignore patterns, matched as Docker does: the last pattern that matches the path or one of its parent
    folders decides, `!` includes again, `**` spans folders, `*` and `?` do not cross a '/'."""
    rules = []
    for line in dockerignore.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        rules.append((re.compile(regex), include))

    def included(path: str) -> bool:
        parts = Path(path).parts
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        verdict = True
        for regex, include in rules:
            if any(regex.fullmatch(c) for c in candidates):
                verdict = include
        return verdict

    return included


class _Hiding:
    """sys.meta_path's PathFinder, less the hidden top-level modules and distributions."""

    modules: frozenset[str] = frozenset()
    distributions: frozenset[str] = frozenset()
    asked: set[str] = set()

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in cls.modules:
            cls.asked.add(top)
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return (d for d in importlib.machinery.PathFinder.find_distributions(*args, **kwargs)
                if canonical(d.metadata["Name"]) not in cls.distributions)

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def hide_all_but(allowed: set[str]) -> frozenset[str]:
    """Hide every installed distribution not in `allowed`; returns the hidden top-level module names."""
    installed = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    hidden = installed - allowed
    owners = importlib.metadata.packages_distributions()
    modules = {m for m, dists in owners.items()
               if {canonical(d) for d in dists} <= hidden and not m.startswith("__")}
    loaded = sorted(m for m in modules if m in sys.modules)
    if loaded:
        raise RuntimeError(f"imported before the guard: {loaded}")
    _Hiding.modules, _Hiding.distributions = frozenset(modules), frozenset(hidden)
    sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _Hiding
    return _Hiding.modules


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    hidden = hide_all_but(set(spec["allowed"]))
    ours = set(sys.modules)  # this helper's own; what the product imports comes after
    sys.path.insert(0, str(ROOT))

    from cog import Path as CogPath

    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    report = {"hidden modules": len(hidden), "cases": []}
    for name, inputs in spec["cases"]:
        metrics: dict = {}
        predictor.record_metric = metrics.__setitem__  # what cog's scope would receive
        delivered = {k: CogPath.validate(data_uri(Path(v))).convert() for k, v in inputs.items()
                     if k in spec["files"] and v is not None}
        try:
            outputs = predictor.predict(**{**inputs, **delivered})
        finally:
            for path in delivered.values():
                path.unlink(missing_ok=True)
        report["cases"].append({"name": name, "outputs": [Path(p).suffix for p in outputs if Path(p).stat().st_size],
                                "path": metrics.get("path"), "speed_mode": metrics.get("speed_mode"),
                                "passes": metrics.get("transformer_passes")})
    report["asked for, hidden"] = sorted(_Hiding.asked)
    files = {Path(m.__file__).resolve() for name, m in list(sys.modules.items())  # (some of torch's are relative)
             if name not in ours and os.path.isabs(getattr(m, "__file__", None) or "")} - {Path(__file__).resolve()}
    report["project files"] = sorted({f.relative_to(ROOT).as_posix() for f in files
                                      if f.is_relative_to(ROOT) and ".venv" not in f.parts})
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
