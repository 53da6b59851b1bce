r"""The lent GPU machine's run, rehearsed on this CPU: the prepared command as the device tool would run it.

  script/gpu-rehearsal [--mirror VENV] [--python PY312] [--keep DIR] [-- ARGS for script/benchmark gpu]

1. the CPU mirror of the GPU machine's image (Python 3.12, torch 2.11, the image's known versions; no diffusers,
   pruna, torchao or peft): VENV (default /tmp/mirror312), built by script/gpu_image.py's make_mirror when absent;
2. the kit: `script/device-kit .whl` in this checkout, the folder the device tool carries (`carry=[".whl"]`);
3. a copy of the working tree laid out as the device tool sends it: the tracked files and the untracked ones git
   does not ignore (no .venv, no weights), plus the carried `.whl`;
4. in that copy, with the mirror's `python3` first on PATH, no FLUX_/PYTHONPATH settings from here and no network
   (a network namespace with only loopback, where this machine allows one):
       script/gpu-benchmark --kit .whl --out OUT -- --tiny ARGS
   ARGS default to `--backend eager --size 256x256 --steps 2 --repeats 1` (every key row measured on a 2-core CPU
   well inside the command's limit; without them the tiny model at 512x512 with inductor reaches only the first
   rows in 8 minutes here);
5. passes when the command exited 0, ended inside its limit (its own "ended after N s (limit L s)" line) and every
   key row is a finite timing: bare diffusers, bf16 compiled, go_fast, Juiced on go_fast, Blink of an eye and the
   diffusers-torchao peer, 1 output each.

It prints each step's seconds; docs/benchmarks.md ("The prepared command, rehearsed") records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--backend", "eager", "--size", "256x256", "--steps", "2", "--repeats", "1"]
KIT = ".whl"


def working_tree_copy(dest: Path, root: Path = ROOT) -> Path:
    """What the device tool sends: the tracked and the untracked-not-ignored files (so no .venv, no weights)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = root / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())
            (dest / name).chmod(source.stat().st_mode)
    return dest


def key_rows() -> list[str]:
    """The rows the first GPU minutes must give, in order (script/gpu_bench/names.py's KEY between its two peers)."""
    from gpu_bench import names

    return [names.BARE, *(name for name, _ in names.KEY), names.TORCHAO]


def verdict(out: Path, rc: int) -> list[str]:
    """What is wrong with a finished run (empty: it passed)."""
    problems = [] if rc == 0 else [f"script/gpu-benchmark exited {rc}"]
    log = (out / "gpu-benchmark.log").read_text() if (out / "gpu-benchmark.log").exists() else ""
    ended = re.search(r"ended after (\d+)s \(limit (\d+)s\)", log)
    if not ended:
        problems.append("the command's log has no 'ended after' line")
    elif int(ended[1]) > int(ended[2]):
        problems.append(f"the command ran {ended[1]} s, over its limit of {ended[2]} s")
    rows = []
    if (out / "results.jsonl").exists():
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    timings = {r["name"]: r for r in rows if r.get("kind") == "timing" and r.get("outputs") == 1}
    for name in key_rows():
        row = timings.get(name)
        if row is None:
            why = [r for r in rows if r.get("kind") in ("skipped", "stopped", "error")]
            problems.append(f"key row missing: {name}" + (f" (last skip/error: {why[-1]})" if why else ""))
        elif not (row.get("finite") and row.get("s", 0) > 0):
            problems.append(f"key row not a finite timing: {name}: {row}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="script/gpu-rehearsal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", default="/tmp/mirror312", help="the CPU mirror of the GPU image (built when absent)")
    p.add_argument("--python", help="the Python 3.12 to build the mirror with (default: found)")
    p.add_argument("--keep", help="lay the copy out here and keep it (default: a temporary folder, removed)")
    p.add_argument("--limit", type=int, default=480, help="the prepared command's --limit (default 480, its own)")
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- ARGS for script/benchmark gpu after --tiny")
    args = p.parse_args(argv)
    bench = [a for a in args.bench if a != "--"] or FAST
    sys.path.insert(0, str(ROOT / "script"))
    import device_kit
    import gpu_image

    times = {}

    def step(label: str, fn):
        start = time.monotonic()
        print(f"\n== gpu-rehearsal: {label}", flush=True)
        result = fn()
        times[label] = time.monotonic() - start
        print(f"== gpu-rehearsal: {label}: {times[label]:.0f} s", flush=True)
        return result

    mirror = Path(args.mirror)
    if not (mirror / "bin" / "python3").exists():
        step("1. mirror (built)", lambda: gpu_image.make_mirror(mirror, args.python))
    else:
        times["1. mirror (present)"] = 0.0
    step("2. kit", lambda: device_kit.build(ROOT / KIT))
    tree = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-rehearsal-"))
    tree.mkdir(parents=True, exist_ok=True)

    def lay_out():
        working_tree_copy(tree)
        shutil.copytree(ROOT / KIT, tree / KIT, dirs_exist_ok=True)
        assert not (tree / ".venv").exists()

    step("3. working tree copy, .whl carried", lay_out)
    out = tree / "gpu-benchmark-out"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_", "TORCHINDUCTOR_", "TRITON_", "VIRTUAL_ENV")) and k not in ("PYTHONPATH", "OUT")}
    env["PATH"] = f"{mirror / 'bin'}:{env.get('PATH', '')}"
    cmd = gpu_image.offline(["script/gpu-benchmark", "--kit", KIT, "--out", str(out), "--limit", str(args.limit),
                              "--", "--tiny", *bench])
    rc = step("4. script/gpu-benchmark (no network)",
              lambda: subprocess.run(cmd, cwd=tree, env=env, timeout=args.limit + 60).returncode)
    problems = verdict(out, rc)
    print("\ngpu-rehearsal: seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"; total {sum(times.values()):.0f}")
    if not args.keep:
        shutil.rmtree(tree, ignore_errors=True)
    if problems:
        print("gpu-rehearsal: FAIL\n  " + "\n  ".join(problems))
        return 1
    print(f"gpu-rehearsal: PASS: every key row measured ({', '.join(key_rows())}), the command ended inside its limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
