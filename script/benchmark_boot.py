"""What a cold boot pays before the first image, measured on this machine (script/benchmark's boot sections).

  imports --old PYTHON        setup's import chain in this environment (.venv: the lean requirements) over the same
                              chain in the environment of PYTHON (e.g. the full one of an earlier checkout), each in a
                              fresh process, alternating, --repeats times each; also pruna's own share
  install-size --old PYTHON --old-rev REV
                              the runtime packages' installed size and their gzip size (level 6, as `docker push`
                              compresses layers) here over PYTHON's environment, counting in each only the
                              distributions its requirements name (this checkout's; REV's requirements.txt there)
  boot-stages                 setup() in fresh processes, stage by stage, on the tiny FLUX compiled with inductor: a first
                              boot (the weights a .tar fetched from a loopback server and extracted as it arrives,
                              empty compile caches, every schema size compiled) and a boot from the first one's compile
                              bundle; each stage's seconds (imports, fetch and extract, load, fp8 copy, compile cache,
                              warm-up) and what a GPU host would pay instead is modelled in docs/benchmarks.md
  tar-stream [--tar-mib N] [--part-mib N]
                              a weights .tar on a loopback server (its own process): extracted while it downloads
                              (flux/tarstream.py) over downloaded whole, then extracted (how flux/weights.py did it
                              before), the same ranged parts and workers for both: time to ready and peak disk,
                              alternating, --repeats times each

The import chain is what setup() imports, found by running it once here on the tiny FLUX (sys.modules after it, in
the order they were first imported); each timed process imports flux first (it sets the libraries' environment),
then torch, diffusers and transformers, then pruna (timed apart: what pruna's import adds), then the rest of the list.
Both environments run this checkout's code, with HF_HUB_OFFLINE=1, and LOCAL_KERNELS set as the old flux/__init__.py
set it (bitsandbytes, in an environment that has it, would otherwise ask the network at import time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3
MiB = 1024**2

# ----- imports -----------------------------------------------------------------------------------------------------

_DISCOVER = """
import json, sys
before = set(sys.modules)
import flux
from predict import Predictor
Predictor().setup()
print(json.dumps([m for m in sys.modules if m not in before]))
"""

_CHAIN = """
import importlib, json, sys, time
names = json.loads(open(sys.argv[1]).read())
t0 = time.perf_counter()
import flux, torch, diffusers, transformers
t1 = time.perf_counter()
import pruna
t2 = time.perf_counter()
failed = 0
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        failed += 1
t3 = time.perf_counter()
print(json.dumps({"total": t3 - t0, "pruna": t2 - t1, "failed": failed, "modules": len(sys.modules)}))
"""


def _child_env(weights_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    return env | {"PYTHONPATH": str(ROOT), "FLUX_WEIGHTS": "tiny", "FLUX_WEIGHTS_DIR": weights_dir,
                  "HF_HUB_OFFLINE": "1", "PRUNA_METRICS_ENABLED": "false",
                  "LOCAL_KERNELS": "kernels-community/quantization-bitsandbytes=/nonexistent/no-hub-kernels"}


def _run(python: str, code: str, *args: str, env: dict) -> dict | list:
    done = subprocess.run([python, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{python} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _need_old(args) -> str:
    if not args.old or not Path(args.old).exists():
        raise SystemExit("--old PYTHON: the python of the environment to compare with (e.g. another checkout's "
                         ".venv/bin/python)")
    return args.old


def imports(args) -> dict:
    old = _need_old(args)
    envs = {"new (this .venv)": sys.executable, "old (--old)": old}
    with tempfile.TemporaryDirectory() as tmp:
        env = _child_env(tmp)
        names = _run(sys.executable, _DISCOVER, env=env)
        listed = Path(tmp) / "modules.json"
        listed.write_text(json.dumps(names))
        runs: dict[str, list[dict]] = {k: [] for k in envs}
        for i in range(args.repeats):
            for name in list(envs) if i % 2 == 0 else list(envs)[::-1]:  # alternating, so load falls on both
                runs[name].append(_run(envs[name], _CHAIN, str(listed), env=env))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("total", "pruna")} for k, v in runs.items()}
    new, old_ = med["new (this .venv)"], med["old (--old)"]
    return {"chain": f"{len(names)} modules setup() imports (tiny FLUX, this CPU)", "repeats": args.repeats,
            **{f"{k} median s": f"{v['total']:.2f} (pruna {v['pruna']:.2f})" for k, v in med.items()},
            **{f"{k} modules loaded": runs[k][0]["modules"] for k in runs},
            "not importable (same in both)": {k: runs[k][0]["failed"] for k in runs},
            "ratio": round(new["total"] / old_["total"], 3)}


# ----- install size -------------------------------------------------------------------------------------------------

_FILES = """
import importlib.metadata as md, json, re, sys
from packaging.requirements import Requirement
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins, nodeps = (set(x) for x in json.loads(sys.argv[1]))
installed = {canon(d.metadata["Name"]): d for d in md.distributions()}
# What a resolver adds to the pins (an unpinned requirement, e.g. torch's setuptools), not following the --no-deps ones.
want, todo = set(pins | nodeps), list(pins)
while todo:
    dist = installed.get(todo.pop())
    for req in (dist.requires or []) if dist else []:
        r = Requirement(req)
        name = canon(r.name)
        if name in installed and name not in want and (r.marker is None or r.marker.evaluate({"extra": ""})):
            want.add(name)
            todo.append(name)
files = [str(d.locate_file(f)) for n, d in installed.items() if n in want for f in d.files or []]
print(json.dumps({"files": files, "added": sorted(want - pins - nodeps), "missing": sorted(want - set(installed))}))
"""


class _GzipCount:
    """A file object that gzips what it is given (level 6) and counts the compressed bytes."""

    def __init__(self):
        self.n = 0
        self._packer = zlib.compressobj(6, zlib.DEFLATED, 31)

    def write(self, data) -> int:
        self.n += len(self._packer.compress(data))
        return len(data)

    def close(self) -> None:
        self.n += len(self._packer.flush())


def _sizes(paths: list[str]) -> tuple[int, int]:
    """The files' bytes, and the bytes of a tar of them compressed by gzip at level 6."""
    installed = 0
    sink = _GzipCount()
    with tarfile.open(fileobj=sink, mode="w|") as tar:
        for path in sorted(set(paths)):
            if os.path.isfile(path) and not os.path.islink(path):
                installed += os.path.getsize(path)
                tar.add(path, recursive=False)
    sink.close()
    return installed, sink.n


def install_size(args) -> dict:
    import image_pins

    old = _need_old(args)
    if not args.old_rev:
        raise SystemExit("--old-rev REV: the git revision whose requirements.txt the --old environment holds")

    def show(path: str) -> str:
        done = subprocess.run(["git", "show", f"{args.old_rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    texts = {"new": ((ROOT / "requirements.txt").read_text(), (ROOT / "cog.yaml").read_text()),
             "old": (show("requirements.txt"), show("cog.yaml"))}
    found_pins = {k: image_pins.read(ROOT, *t) for k, t in texts.items()}
    sets = {k: set(f["requirements"]) | set(f["run"]) for k, f in found_pins.items()}
    nodeps = {k: {n for n, pin in f["run"].items() if pin.nodeps} for k, f in found_pins.items()}
    pythons = {"new": sys.executable, "old": old}
    found = {k: _run(pythons[k], _FILES, json.dumps([sorted(sets[k] - nodeps[k]), sorted(nodeps[k])]),
                     env=dict(os.environ)) for k in sets}
    results: dict[str, tuple[int, int]] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, _sizes(found[k]["files"])))
               for k in sets]  # zlib lets go of the GIL: both at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saving = (results["old"][1] - results["new"][1]) / GiB
    return {**{f"{k} packages": f"{len(sets[k])} pinned, + {', '.join(found[k]['added']) or 'nothing'} (resolved); "
                                f"{len(found[k]['missing'])} not installed" for k in sets},
            **{f"{k} installed GiB": round(results[k][0] / GiB, 3) for k in sets},
            **{f"{k} gzip -6 GiB": round(results[k][1] / GiB, 3) for k in sets},
            "compressed saving GiB": round(saving, 3),
            "ratio": round(results["new"][1] / results["old"][1], 3),
            "targets": [("runtime packages", len(sets["new"]), "<=", 100),
                        ("compressed saving GiB", round(saving, 3), ">=", 0.4)]}


# ----- tar streaming ------------------------------------------------------------------------------------------------


def _archive(mib: int) -> bytes:
    """A weights-like .tar: a few large files of random bytes and some small ones, `mib` MiB in all."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        sizes = [64 * MiB] * (mib // 64) + [mib % 64 * MiB]
        for i, size in enumerate(s for s in sizes if s):
            info = tarfile.TarInfo(f"FLUX/transformer/part-{i:03d}.safetensors")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        for name in ("model_index.json", "scheduler/config.json", "transformer/config.json"):
            info = tarfile.TarInfo(f"FLUX/{name}")
            info.size = 2048
            tar.addfile(info, io.BytesIO(os.urandom(2048)))
    return buf.getvalue()


def _disk(folder: Path) -> int:
    """Bytes allocated on disk under folder (a sparse download counts what it holds so far)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _peak_while(folder: Path, fn) -> tuple[float, int]:
    """fn's seconds, and the most disk used under folder while it ran (sampled, and after every file tarfile writes)."""
    peak = [0]
    done = threading.Event()
    original = tarfile.TarFile.makefile

    def makefile(self, tarinfo, targetpath):
        original(self, tarinfo, targetpath)
        peak[0] = max(peak[0], _disk(folder))

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _disk(folder))

    tarfile.TarFile.makefile = makefile
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started, peak[0]
    finally:
        done.set()
        sampler.join()
        tarfile.TarFile.makefile = original


def _compare(ways: dict, runs: dict, url: str, tmp: Path, repeats: int) -> None:
    for i in range(repeats):
        for name in list(ways) if i % 2 == 0 else list(ways)[::-1]:  # alternating, so load falls on both
            folder = tmp / f"run-{i}-{len(runs[name])}"
            folder.mkdir()
            runs[name].append(_peak_while(folder, lambda: ways[name](url, folder / "unpacked")))
            shutil.rmtree(folder)


def tar_stream(args) -> dict:
    os.environ["FLUX_ALLOW_PRIVATE_URLS"] = "1"  # the server is on 127.0.0.1
    from flux import download as dl
    from flux import tarstream, weights

    body = _archive(args.tar_mib)
    # Both ways fetch the same parts with the same workers: only when extraction happens differs.
    limits = dataclasses.replace(weights.TAR_LIMITS, part_size=args.part_mib * MiB)

    def streamed(url, where: Path):
        tarstream.extract_url(url, where, max_bytes=weights.MAX_TAR_BYTES, limits=limits)

    def whole_then_extract(url, where: Path):
        archive = dl.download(url, where.parent / f"{where.name}.tar", limits=limits)
        tarstream.extract_tar(archive, where, max_bytes=weights.MAX_TAR_BYTES)
        archive.unlink()

    ways = {"streamed": streamed, "download, then extract": whole_then_extract}
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in ways}
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "served.tar"
        archive.write_bytes(body)
        with _served(archive) as url:
            _compare(ways, runs, url, Path(tmp), args.repeats)
    med = {k: (statistics.median(s for s, _ in v), max(p for _, p in v)) for k, v in runs.items()}
    size = len(body)
    peak_ratio = med["streamed"][1] / size
    ratio = round(med["streamed"][0] / med["download, then extract"][0], 3)
    return {"archive": f"{size / MiB:.0f} MiB from 127.0.0.1 (FileServer, its own process), parts of "
                       f"{limits.part_size // MiB} MiB, {limits.workers} at a time",
            "repeats": args.repeats,
            **{f"{k}: median s, peak disk / tar": f"{s:.2f} s, {p / size:.2f}" for k, (s, p) in med.items()},
            "ratio": ratio, "targets": [("time to ready (ratio)", ratio, "<=", 0.7),
                                        ("peak disk / tar, streamed", round(peak_ratio, 3), "<=", 1.1)]}


# ----- boot stages ---------------------------------------------------------------------------------------------------

_BOOT = """
import json, sys, time
t0 = time.perf_counter()
import flux
from predict import Predictor
t1 = time.perf_counter()
p = Predictor()
p.setup()
t2 = time.perf_counter()
out = {"imports": t1 - t0, "setup": t2 - t1, **{f"stage {k}": v for k, v in p.engine.stages.seconds.items()}}
if len(sys.argv) > 1:  # export this boot's compile bundle there
    from flux import compile_cache
    compile_cache.export(p.engine.settings.cache_dir, __import__("pathlib").Path(sys.argv[1]))
print(json.dumps(out))
"""


@contextlib.contextmanager
def _served(path: Path):
    """The URL of a file served from 127.0.0.1 by a process of its own, as a remote host would serve it (in this one
    the server would share the GIL with the download threads and the extractor)."""
    server = subprocess.Popen([sys.executable, str(ROOT / "script" / "fileserver.py"), str(path)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield server.stdout.readline().strip()
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def boot_stages(args) -> dict:
    """Two boots of the tiny FLUX compiled with inductor, each in a fresh process with empty compile caches: the
    first compiles (and exports its bundle), the second boots from that bundle."""
    from flux import variants

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = subprocess.run([sys.executable, "-c", "import flux; from flux import weights; "
                               "print(weights.locate('tiny', 'dev'))"], cwd=ROOT, env=_child_env(str(tmp / "build")),
                              check=True, capture_output=True, text=True)
        base = Path(made.stdout.strip().splitlines()[-1])
        tar = tmp / "dev.tar"
        with tarfile.open(tar, "w") as archive:
            archive.add(base, arcname=base.name)
        tar_mib = tar.stat().st_size / MiB
        with _served(tar) as url:
            boots = {}
            for name, extra, argv in (("first boot (compiles)", {}, [str(tmp / "bundle")]),
                                      ("boot from the bundle", {"FLUX_COMPILE_CACHE": str(tmp / "bundle")}, [])):
                child = _child_env(str(tmp / name.split()[0]))
                child |= {"FLUX_WEIGHTS": url, "FLUX_ALLOW_PRIVATE_URLS": "1", "FLUX_COMPILE": "inductor",
                          "FLUX_WARMUP": "1", "FLUX_PREFETCH": "0", "FLUX_SAFETY_CHECKER": "tiny",
                          "FLUX_SAFETY_SECOND": "tiny", **{v.setting: "tiny" for v in variants.ON_FIRST_USE}, **extra}
                started = time.perf_counter()
                boots[name] = _run(sys.executable, _BOOT, *argv, env=child)
                boots[name]["process"] = time.perf_counter() - started
    first, again = boots.values()
    stages = sorted({k for b in boots.values() for k in b}, key=lambda k: (k == "process", k.startswith("stage"), k))
    return {"model": f"tiny FLUX, weights a {tar_mib:.1f} MiB .tar on 127.0.0.1, inductor on this CPU",
            **{f"{k} (s)": " / ".join(f"{b.get(k, 0.0):.1f}" for b in boots.values()) for k in stages},
            "columns": " / ".join(boots),
            "ratio": round(again["process"] / first["process"], 3)}
