"""What the image installs: the one reader of requirements.txt's pins and cog.yaml's `run:` pins.

`cog build` installs requirements.txt through pip, then cog (sdk_version), then runs cog.yaml's `build.run` lines;
ours pin more packages there, some without their declared dependencies (`--no-deps`: requirements.txt's header says
why). Everything that needs "the versions the image runs" reads them here, so a pin can move from one file to the
other without breaking any of them: script/setup (the .venv), script/device-kit (the GPU kit's wheels),
script/benchmark install-size, tests/helpers/runtime_only.py (the runtime-only environment).

  python3 script/image_pins.py nodeps     the `run:` pins installed with --no-deps, one `name==version` a line
  python3 script/image_pins.py deps       the `run:` pins installed with their dependencies, one a line
  python3 script/image_pins.py json       {"requirements": {...}, "run": {...}, "sdk_version": "..."}

Standard library only: script/setup runs it with the machine's python3 before any environment exists, and the GPU
machine's python3 has no PyYAML guarantee. cog.yaml is read as far as this project writes it: `build.run` as a list
of strings (or `- command: ...` items) and `build.sdk_version`; a `run:` line that installs a package without an
exact `==` pin is an error (every dependency is pinned exactly).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class PinError(ValueError):
    pass


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pin:
    name: str  # as written
    version: str
    nodeps: bool = False  # installed with pip's --no-deps (a `run:` line)

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def requirements(text: str) -> dict[str, Pin]:
    """A requirements file's exact pins by canonical name (comments, options and `-r` lines skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = (part.strip() for part in line.split("==", 1))
            name = name.split("[", 1)[0]
            pins[canonical(name)] = Pin(name, version)
    return pins


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def _build_section(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith((" ", "\t")):
            inside = line.split("#", 1)[0].strip() == "build:"
            continue
        if inside:
            lines.append(line)
    return lines


def sdk_version(text: str) -> str | None:
    """cog.yaml's build.sdk_version (the cog the image installs)."""
    for line in _build_section(text):
        key, _, value = line.split("#", 1)[0].strip().partition(":")
        if key == "sdk_version":
            return _unquote(value)
    return None


def run_lines(text: str) -> list[str]:
    """cog.yaml's build.run commands, in order, as cog runs them."""
    commands, indent = [], None
    for line in _build_section(text):
        depth = len(line) - len(line.lstrip())
        stripped = line.strip()
        if indent is None:
            if stripped.split("#", 1)[0].strip() == "run:":
                indent = depth
            continue
        if depth <= indent:
            break
        if stripped.startswith("- "):
            item = stripped[2:].strip()
            if item.startswith("command:"):
                item = item[len("command:"):]
            commands.append(_unquote(item))
    return commands


def run_pins(text: str) -> dict[str, Pin]:
    """The packages cog.yaml's `run:` lines install with pip, by canonical name, each pinned exactly."""
    pins = {}
    for command in run_lines(text):
        words = shlex.split(command)
        if "pip" not in words or "install" not in words:
            continue
        nodeps = "--no-deps" in words
        for word in words[words.index("install") + 1:]:
            if word.startswith("-") or "=" in word.split("==", 1)[0]:  # an option, or VAR=value
                continue
            if "==" not in word:
                raise PinError(f"cog.yaml: `{command}` installs {word!r} without an exact pin (name==version)")
            name, version = word.split("==", 1)
            pins[canonical(name)] = Pin(name, version, nodeps)
    return pins


def read(root: Path = ROOT, requirements_text: str | None = None, cog_yaml: str | None = None) -> dict:
    """{"requirements": pins, "run": pins, "sdk_version": version} of a checkout (or of the texts given)."""
    req = requirements_text if requirements_text is not None else (root / "requirements.txt").read_text()
    cog = cog_yaml if cog_yaml is not None else (root / "cog.yaml").read_text()
    return {"requirements": requirements(req), "run": run_pins(cog), "sdk_version": sdk_version(cog)}


def image_pins(root: Path = ROOT, requirements_text: str | None = None, cog_yaml: str | None = None) -> dict[str, Pin]:
    """Every package the image installs at an exact pin (requirements.txt, then the `run:` lines, which win), by
    canonical name. cog's own SDK is not in it (cog installs `cog==sdk_version` and what that requires)."""
    found = read(root, requirements_text, cog_yaml)
    return {**found["requirements"], **found["run"]}


def versions(root: Path = ROOT) -> dict[str, str]:
    """image_pins() as {canonical name: version}."""
    return {name: pin.version for name, pin in image_pins(root).items()}


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "json"
    try:
        found = read()
    except PinError as exc:
        print(f"script/image_pins.py: {exc}", file=sys.stderr)
        return 1
    if what in ("nodeps", "deps"):
        for pin in found["run"].values():
            if pin.nodeps == (what == "nodeps"):
                print(pin.spec)
    elif what == "json":
        print(json.dumps({"requirements": {p.name: p.version for p in found["requirements"].values()},
                          "run": {p.name: {"version": p.version, "nodeps": p.nodeps} for p in found["run"].values()},
                          "sdk_version": found["sdk_version"]}, indent=1))
    else:
        print("usage: script/image_pins.py [nodeps|deps|json]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
