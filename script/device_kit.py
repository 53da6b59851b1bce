r"""The wheels a GPU machine (the workplace's nvidia-h200 image, no network) needs to run `script/benchmark gpu`.

  script/device-kit [DIR]                  download the kit into DIR (default .whl, git-ignored), write DIR/README.txt
  script/device-kit --list                 what the kit carries and leaves out, and why; downloads nothing
  script/device-kit --make-mirror VENV     build a CPU virtualenv that mirrors the GPU image (torch 2.11, ...)
  script/device-kit DIR --check [--mirror VENV] [--site SITE] [--bench] [--tests]
                                           (re)make DIR, install it as the GPU machine does into a fresh SITE
                                           (default /tmp/site312) and run, with VENV's python (default
                                           /tmp/mirror312) and no network: 1. the imports, 2. a tiny engine smoke
                                           run (go_fast + Juiced), 3. with --bench, `benchmark.py gpu --tiny` when
                                           it exists, 4. with --tests, the test suite (cog and pytest added in a
                                           folder of their own, SITE-tests, never in the kit)
  script/device-kit DIR --verify           on the GPU machine, after the install below: each carried wheel's
                                           requirements against what that python sees, then the imports

On the GPU machine (carry `.whl`), `script/gpu-benchmark` installs it and runs the benchmark; by hand:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site

What it carries: the versions the container image installs (script/image_pins.py: requirements.txt and cog.yaml's
`run:` pins) of the packages the GPU image lacks (diffusers, pruna, torchao),
the one whose image version does not fit (peft: pruna 0.3.4 needs peft>=0.18,<0.19; the image's peft version is
unknown, so it is carried), and what those need at import time that the image lacks. pruna declares ~40
requirements; most are for algorithms or metrics this project never runs, imported lazily by them (or by an
algorithm module that pruna skips with a warning when its import fails). The set below was found by importing, in a
mirror of the image (`--make-mirror`), with each candidate left out in turn; `--check` repeats the proof.

Safe to run again: a wheel already in DIR at the right version is kept; another version of a kit package is removed
(two versions of one package would stop the install). It fails if DIR's wheels exceed 56 MiB in all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import image_pins  # script/image_pins.py: what the container image installs
from gpu_image import IMAGE_PACKAGES, IMAGE_VERSIONS, make_mirror, offline  # the GPU machine's image

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # a python without packaging: pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 56

# ----- the kit ---------------------------------------------------------------------------------------------------
# name -> why it travels. Versions are the image's pins (script/image_pins.py).
KIT = {
    "diffusers": "not on the image (the FLUX pipelines)",
    "pruna": "not on the image (smash: fora; the fp8 configs of its torchao algorithm)",
    "torchao": "not on the image (fp8 quantization; pruna<0.17 wants 0.12..0.16)",
    "peft": "the image's peft is of unknown version; pruna 0.3.4 needs peft>=0.18,<0.19 (diffusers' LoRA loading)",
    "configspace": "pruna.config.smash_config imports ConfigSpace",
    "more-itertools": "ConfigSpace imports more_itertools",
    "datasets": "pruna.config.smash_config imports pruna.data, which imports datasets",
    "dill": "datasets reads dill's version at import; multiprocess needs it",
    "multiprocess": "datasets.arrow_dataset imports multiprocess",
    "importlib-metadata": "pruna/__init__ does `from importlib_metadata import version`",
    "lazy-importer": "importlib_metadata 10 imports lazy_importer",
    "opentelemetry-api": "pruna.telemetry imports the OTLP HTTP exporter at import (exporting stays off: "
                         "PRUNA_METRICS_ENABLED=false)",
    "opentelemetry-sdk": "pruna.telemetry (MeterProvider)",
    "opentelemetry-semantic-conventions": "opentelemetry-sdk",
    "opentelemetry-proto": "the OTLP exporter",
    "opentelemetry-exporter-otlp-proto-http": "pruna.telemetry (OTLPMetricExporter)",
    "opentelemetry-exporter-otlp-proto-common": "the OTLP HTTP exporter",
    "opentelemetry-exporter-otlp-common": "the OTLP HTTP exporter",
    "opentelemetry-exporter-http-transport": "the OTLP HTTP exporter",
}

# Requirements of carried wheels that are left out on purpose, and why that is safe.
LEFT_OUT = {
    "aenum": "only pruna.algorithms.flash_attn3 imports it; pruna skips that algorithm module with a warning "
             "('Skipping pruna.algorithms.flash_attn3 (import error)'); this project does not use flash_attn3",
    "kernels": "as aenum (flash_attn3 only); also brings kernels-data (1.2 MiB)",
    "bitsandbytes": "4/8-bit algorithms (llm_int8, diffusers_int8) import it when used; diffusers imports it only "
                    "if installed",
    "codecarbon": "pruna's energy metric (evaluation) only",
    "deepcache": "the deepcache algorithm only, imported when it runs",
    "gliner": "an evaluation metric only",
    "hqq": "the hqq algorithms only",
    "imageio-ffmpeg": "video saving / evaluation only",
    "librosa": "audio datasets, loaded when used",
    "soundfile": "audio datasets, loaded when used",
    "numpydoc": "pruna's docstring checks (development) only",
    "opencv-python": "upscale / evaluation only (the image has opencv-python-headless)",
    "opentelemetry-exporter-otlp": "a meta-package (HTTP + gRPC exporters): pruna imports only the HTTP one, "
                                   "which is carried",
    "openvino": "the openvino compiler only",
    "optimum-quanto": "the quanto algorithm only",
    "piq": "evaluation metrics only",
    "termcolor": "not imported by the paths used here",
    "thop": "evaluation (MACs) only",
    "torch-pruning": "the structured pruning algorithm only",
    "trl": "distillation / LLM algorithms only",
    "googleapis-common-protos": "the OTLP exporter imports it when it exports (never: telemetry is off)",
    "tomlkit": "kernels' lock files only (kernels is not carried)",
}

PLATFORMS = (["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
              "manylinux1_x86_64"]
             + [f"manylinux_2_{n}_x86_64" for n in (24, 31, 34, 35, 39, 26, 25, 23, 22, 21, 20, 19, 18)])

TARGET_ENV = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
                  sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                  implementation_name="cpython", platform_python_implementation="CPython", os_name="posix")

IMPORTS = ("import flux, flux.engine, flux.speed, flux.fakes.fullsize, flux.fakes.tiny, lora_loader, flux.fakes.loras, "
           "pruna, torchao, diffusers, peft; "
           "from pruna.algorithms import AlgorithmRegistry as R; "
           "missing = {'fora', 'torchao'} - set(R._registry); assert not missing, missing; "
           "print('imports ok: pruna', pruna.__version__, 'diffusers', diffusers.__version__, "
           "'torchao', torchao.__version__, 'peft', peft.__version__)")

SMOKE = """
import flux, logging
from flux import logs, weights
logs.configure()
from flux.engine import load as engine_load
from flux.request import Request
e = engine_load(weights.sources(has_cuda=False))
r = e.generate(Request.build(prompt='a prune', num_inference_steps=2, megapixels='0.25', go_fast=True,
                             speed_mode='Juiced \U0001F525 (default)'))
print('smoke ok: images', len(r.images))
"""


def pins() -> dict[str, str]:
    """{canonical name: version} of what the container image installs (script/image_pins.py)."""
    return image_pins.versions(ROOT)


def kit_versions() -> dict[str, Version]:
    """Each carried package's version: the image's pin. Fails naming the packages the image does not pin."""
    pinned = pins()
    missing = [n for n in KIT if canonicalize_name(n) not in pinned]
    if missing:
        sys.exit(f"device-kit: the image pins none of: {', '.join(missing)} (requirements.txt or cog.yaml's run: "
                 "lines, as script/image_pins.py reads them)")
    return {canonicalize_name(n): Version(pinned[canonicalize_name(n)]) for n in KIT}


def mib(n: int) -> float:
    return n / 2 ** 20


# ----- download --------------------------------------------------------------------------------------------------


def wheels_in(folder: Path) -> dict[str, list[tuple[Path, Version]]]:
    found: dict[str, list[tuple[Path, Version]]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        found.setdefault(canonicalize_name(name), []).append((path, version))
    return found


def download(folder: Path, name: str, version: str) -> Path:
    with tempfile.TemporaryDirectory(dir=folder, prefix=".dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        cmd += ["-d", tmp, f"{name}=={version}"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if run.returncode or len(got) != 1:
            sys.exit(f"device-kit: could not download {name}=={version}:\n{run.stderr.strip()}")
        final = folder / got[0].name
        os.replace(got[0], final)
        return final


def build(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    carried = kit_versions()
    have = wheels_in(folder)
    for name in KIT:
        key = canonicalize_name(name)
        want = carried[key]
        for path, version in have.get(key, []):
            if version != want:
                print(f"device-kit: removing {path.name} (the kit pins {name}=={want})")
                path.unlink()
        if any(v == want for _, v in have.get(key, [])):
            continue
        print(f"device-kit: downloading {name}=={want}", flush=True)
        download(folder, name, str(want))
    have = wheels_in(folder)
    strangers = sorted(set(have) - {canonicalize_name(n) for n in KIT})
    for key in strangers:
        for path, _ in have[key]:
            print(f"device-kit: warning: {path.name} is not part of the kit; it travels and installs too")
    doubles = [key for key, found in have.items() if len(found) > 1]
    if doubles:
        sys.exit(f"device-kit: more than one version of {', '.join(doubles)} in {folder}: keep one")
    report = describe(folder)
    print(report)
    (folder / "README.txt").write_text(report)
    total = sum(p.stat().st_size for p in folder.glob("*.whl"))
    if mib(total) > LIMIT_MIB:
        sys.exit(f"device-kit: FAIL: the wheels in {folder} take {mib(total):.1f} MiB, over the {LIMIT_MIB} MiB "
                 "that may travel")
    return 0


# ----- what it carries, what it leaves out -----------------------------------------------------------------------


def wheel_requires(path: Path) -> list[Requirement]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    reqs = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(dict(TARGET_ENV, extra="")):
                reqs.append(req)
    return reqs


def describe(folder: Path | None) -> str:
    pinned = pins()
    carried = kit_versions()
    lines = ["The device kit: wheels for the GPU machine's image (nvidia-h200, Python 3.12, torch 2.11), made by",
             "script/device-kit (script/device_kit.py says why each one travels and how the set was found).",
             "",
             "On the GPU machine (carry this folder), script/gpu-benchmark installs it and runs the benchmark;",
             "by hand:",
             "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\",
             f"    --target /tmp/site {folder.name if folder else '.whl'}/*.whl && export PYTHONPATH=/tmp/site",
             "", "Carried:"]
    total = 0
    files = wheels_in(folder) if folder else {}
    for name, why in KIT.items():
        key = canonicalize_name(name)
        size = files[key][0][0].stat().st_size if key in files else 0
        total += size
        shown = f"{mib(size):6.2f} MiB" if key in files else "   (not downloaded)" if files else "         "
        lines.append(f"  {name:42s} {str(carried[key]):10s} {shown}  {why}")
    lines.append(f"  {'total':42s} {'':10s} {mib(total):6.2f} MiB  (limit {LIMIT_MIB} MiB)")

    # Every requirement of every carried wheel: carried, on the image (checked where its version is known), or
    # left out (and why).
    problems, unknown, left, image_ok = [], {}, {}, set()
    for name in KIT:
        key = canonicalize_name(name)
        if key not in files:
            continue
        for req in wheel_requires(files[key][0][0]):
            dep = canonicalize_name(req.name)
            if dep in carried:
                if not req.specifier.contains(carried[dep], prereleases=True):
                    problems.append(f"{name} needs {req}, the kit carries {dep} {carried[dep]}")
            elif dep in IMAGE_VERSIONS:
                if not req.specifier.contains(IMAGE_VERSIONS[dep], prereleases=True):
                    problems.append(f"{name} needs {req}, the image has {dep} {IMAGE_VERSIONS[dep]}")
                image_ok.add(dep)
            elif dep in IMAGE_PACKAGES:
                if str(req.specifier):
                    unknown.setdefault(f"{dep}{req.specifier}", []).append(name)
            else:
                left.setdefault(dep, []).append(name)
    lines += ["", "Left out (required by a carried wheel, on neither the image nor the kit; not needed to import",
              "pruna and run pruna.smash with fora and torchao, as `script/device-kit --check` shows):"]
    if not files:  # nothing downloaded (--list): what the kit is known to leave out
        left = {dep: ["pruna"] for dep in LEFT_OUT}
    for dep in sorted(left):
        lines.append(f"  {dep:30s} (of {', '.join(left[dep])}): {LEFT_OUT.get(dep, 'not imported at import time')}")
    if files:
        pruna_reqs = {canonicalize_name(r.name) for r in wheel_requires(files["pruna"][0][0])}
        on_image = sorted(d for d in pruna_reqs if d not in carried and d in IMAGE_PACKAGES)
        lines += ["", f"pruna's declared requirements on the image, not carried: {', '.join(on_image)}"]
    if unknown:
        lines += ["", "Constraints on image packages whose image version is unknown (not checked here; "
                  "`--verify` checks them there):"]
        lines += [f"  {spec} (from {', '.join(sorted(set(by)))})" for spec, by in sorted(unknown.items())]
    lines += ["", "GPU image versions against the container's pins; the API differences to expect:"]
    for dep, version in sorted(IMAGE_VERSIONS.items()):
        if dep in pinned and pinned[dep] != version:
            lines.append(f"  {dep:20s} image {version:10s} project {pinned[dep]}")
    if problems:
        lines += ["", "PROBLEMS:"] + [f"  {p}" for p in problems]
    return "\n".join(lines) + "\n"


# ----- checks (in the mirror: script/gpu_image.py) -----------------------------------------------------------------------------------------


# What the test suite needs beyond the image and the kit (cog is not on the image): for `--check --tests` only, in a
# folder of its own beside the kit's site; never part of the kit.
TEST_OVERLAY = ["cog", "coglet", "structlog", "pytest", "iniconfig", "pluggy"]


def check(folder: Path, venv: Path, site: Path, bench: bool, tests: bool = False) -> int:
    python = str(venv / "bin/python")
    shutil.rmtree(site, ignore_errors=True)
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", str(site), *sorted(map(str, folder.glob("*.whl")))]
    print("+", " ".join(install[:11]), f"{site} {folder}/*.whl", flush=True)
    subprocess.run(install, check=True)
    weights_dir = Path(tempfile.mkdtemp(prefix="kitcheck-weights-"))
    env = dict(os.environ, PYTHONPATH=f"{site}:{ROOT}", PYTHONUNBUFFERED="1", FLUX_WEIGHTS="tiny",
               FLUX_WEIGHTS_DIR=str(weights_dir))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    results = []

    def step(label: str, cmd: list[str], timeout: int) -> None:
        print(f"\n== {label}", flush=True)
        start = time.monotonic()
        try:
            rc = subprocess.run(offline(cmd), env=env, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        results.append((label, rc, time.monotonic() - start))

    if tests:
        overlay = Path(f"{site}-tests")
        shutil.rmtree(overlay, ignore_errors=True)
        dev = {k: p.version for k, p in image_pins.requirements((ROOT / "requirements-dev.txt").read_text()).items()}
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(overlay), *(f"{n}=={dev[n]}" for n in TEST_OVERLAY)], check=True)
    step("1. imports", [python, "-c", IMPORTS], 600)
    step("2. smoke run (tiny engine, go_fast, Juiced)", [python, "-c", SMOKE], 1200)
    if bench:
        probe = subprocess.run([python, "script/benchmark.py", "gpu", "--help"], env=env, cwd=ROOT,
                               capture_output=True, text=True)
        if probe.returncode == 0 and "--tiny" in probe.stdout:
            out = Path(tempfile.mkdtemp(prefix="kitbench-"))
            # dynamo's eager backend: every section runs in minutes on a CPU (as tests/test_benchmark.py runs it)
            step("3. benchmark gpu --tiny", [python, "script/benchmark.py", "gpu", "--tiny", "--backend", "eager",
                                             "--size", "256x256", "--steps", "2", "--repeats", "1", "--budget", "900",
                                             "--out", str(out)], 1800)
        else:
            print("\n== 3. benchmark gpu --tiny: script/benchmark.py has no 'gpu --tiny' command yet")
            results.append(("3. benchmark gpu --tiny", "absent", 0.0))
    if tests:
        env["PYTHONPATH"] = f"{site}:{overlay}:{ROOT}"
        step("4. the test suite (no tests/test_fuzz.py: schemathesis is not there)",
             [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_fuzz.py", "-rf", "tests"],
             3600)
    shutil.rmtree(weights_dir, ignore_errors=True)
    print("\nResults:")
    for label, rc, secs in results:
        verdict = "SKIP" if rc == "absent" else "PASS" if rc == 0 else "FAIL"
        print(f"  {verdict} {label} (rc {rc}, {secs:.0f} s)")
    return 0 if all(rc in (0, "absent") for _, rc, _ in results) else 1


def verify(folder: Path) -> int:
    """On the GPU machine, with the kit installed and on PYTHONPATH: each carried wheel's requirements against what
    this python sees (the image's unknown versions included), then the imports."""
    import importlib.metadata as md

    bad, conflicts, seen = 0, 0, {}
    kit = wheels_in(folder)
    for key, found in sorted(kit.items()):
        for req in wheel_requires(found[0][0]):
            dep = canonicalize_name(req.name)
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                if dep not in LEFT_OUT:
                    print(f"  MISSING {req} (of {key})")
                    bad += 1
                continue
            if dep not in kit:
                seen[dep] = have
            if not req.specifier.contains(have, prereleases=True):
                # A warning: declared bounds are often wider than what an import needs (datasets 5.2 declares
                # pyarrow>=24 and imports with pyarrow 21); the imports below decide.
                print(f"  CONFLICT (warning) {key} declares {req}, found {dep} {have}")
                conflicts += 1
    print("device-kit: versions found here for the kit's requirements:",
          ", ".join(f"{d} {v}" for d, v in sorted(seen.items())))
    kit_paths = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(":") if p}
    below = [p for p in sys.path if p and os.path.realpath(p) not in kit_paths]
    shadowed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions(path=below)
                if canonicalize_name(d.metadata["Name"]) in kit}
    if shadowed:
        print("device-kit: the kit shadows these of this python's own:",
              ", ".join(f"{d} {v}" for d, v in sorted(shadowed.items())))
    print(f"device-kit: verify: {bad} missing requirement(s), {conflicts} version conflict(s) (warnings)")
    rc = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=f"{os.environ.get('PYTHONPATH', '')}:{ROOT}")).returncode
    return 1 if bad or rc else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="script/device-kit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=str(ROOT / ".whl"), help="the kit folder (default: .whl)")
    p.add_argument("--list", action="store_true", help="print what the kit carries and leaves out; download nothing")
    p.add_argument("--make-mirror", metavar="VENV", help="build the CPU mirror of the GPU image at VENV")
    p.add_argument("--python", help="the Python 3.12 for --make-mirror (default: found)")
    p.add_argument("--check", action="store_true", help="install DIR into --site and run the checks with --mirror")
    p.add_argument("--mirror", metavar="VENV", default="/tmp/mirror312", help="the mirror for --check")
    p.add_argument("--site", default="/tmp/site312", help="where --check installs the kit (emptied first)")
    p.add_argument("--bench", action="store_true", help="--check also runs `benchmark.py gpu --tiny`")
    p.add_argument("--tests", action="store_true", help="--check also runs the test suite (cog and pytest from "
                   "PyPI into SITE-tests, beside the kit)")
    p.add_argument("--verify", action="store_true", help="on the GPU machine: check the installed kit")
    args = p.parse_args(argv)
    folder = Path(args.dir).resolve()
    if args.make_mirror:
        return make_mirror(Path(args.make_mirror), args.python)
    if args.list:
        print(describe(folder if any(folder.glob("*.whl")) else None))
        return 0
    if args.verify:
        return verify(folder)
    build(folder)
    if args.check:
        return check(folder, Path(args.mirror), Path(args.site), args.bench, args.tests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
