"""Compile caches that reach a new container: the compile bundle.

A boot compiles the transformer blocks (and the VAE decoder) for its GPU; a bundle carries that work to the next
container, so that it loads the compiled graphs instead of compiling them. A bundle is a folder:

  manifest.json   what it was compiled for (`key`: torch, triton, CUDA, GPU, the speed settings, the transformer's
                  architecture; no path) and that key's digest
  artifacts.bin   torch.compiler.save_cache_artifacts(): inductor's FX graphs, AOTAutograd's, autotuning results
  inductor/       inductor's compiled kernel files (the C++ libraries on a CPU; on a GPU the triton kernels also
                  travel inside the FX graph entries)
  triton/         triton's cache

FLUX_COMPILE_CACHE names one (flux/settings.py): a local folder, an https URL of a .tar of the folder, or a Hugging
Face repo id, fetched in setup beside the weights (flux/weights.py). Without it the working folder
weights/compile-cache is the bundle: inductor's and triton's caches live there (flux/__init__.py), and every boot
that compiles writes its manifest and artifacts there. `script/compile-cache export DIR` copies it out after a boot,
for a deployer to host next to the weights.

A source that cannot be reached is a setup error naming FLUX_COMPILE_CACHE. A bundle that is corrupt, or was made
for other software, another GPU or other settings, costs a recompile and a warning, never a failed boot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from . import weights
from .errors import SettingsError, UserError
from .settings import Settings

log = logging.getLogger(__name__)

VERSION = "2"  # bump when what is compiled changes in a way torch's own cache keys would not notice
MANIFEST, ARTIFACTS = "manifest.json", "artifacts.bin"
_NOT_KERNELS = ("fxgraph", "aotautograd", "locks")  # inductor's own cache entries travel in artifacts.bin


def key(settings: Settings, transformer, dtype: torch.dtype, device: torch.device) -> dict:
    """What the compiled graphs depend on beyond torch's own cache keys; no path, so a bundle made in one folder
    serves another."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        where = dict(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                     cuda=torch.version.cuda)
    else:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        where = dict(cpu=platform.machine(), isa=str(pick_vec_isa()))
    architecture = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(transformer.config).items()
                    if not k.startswith("_")}  # _name_or_path is where it was loaded from
    return dict(version=VERSION, torch=torch.__version__, triton=triton_version, **where, dtype=str(dtype),
                **settings.graph_settings(), architecture=architecture)


def digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dirs() -> tuple[Path, Path]:
    """inductor's and triton's cache folders (flux/__init__.py points them into the working folder)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()), Path(os.environ.get("TRITON_CACHE_DIR") or Path(cache_dir()) / "triton")


def fetch(settings: Settings) -> Path | None:
    """The bundle's local folder (fetched if it is a URL or a Hugging Face repo), or None when there is none yet."""
    source = settings.compile_cache
    if source is None:
        folder = settings.cache_dir
        return folder if (folder / MANIFEST).is_file() else None
    local = not source.startswith(("https://", "http://")) and (
        Path(source).expanduser().is_dir() or source.startswith(("/", "./", "../", "~")))
    if local and not Path(source).expanduser().is_dir():
        raise SettingsError(f"FLUX_COMPILE_CACHE={source!r}: the folder does not exist. Point it at a compile bundle "
                            "(script/compile-cache export DIR) or unset it.")
    try:
        return weights.locate(source, weights.COMPILE_CACHE)
    except UserError as exc:  # not found, no network, a private address, not a .tar
        raise SettingsError(f"FLUX_COMPILE_CACHE could not be fetched: {exc}") from None


def load(folder: Path | None, ours: dict, shown: str, working: Path) -> bool:
    """Load a bundle's artifacts if it was made for exactly this key (its kernel files copied into the live cache
    folders unless it is the working folder itself); anything wrong is a warning."""
    if folder is None:
        log.info("compile cache: none yet (%s); compiling from scratch", shown)
        return False
    started = time.monotonic()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        theirs = manifest["key"]
        if digest(theirs) != digest(ours):
            changed = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
            log.warning("compile cache %s was made for other %s (%s); compiling from scratch", shown,
                        ", ".join(changed), "; ".join(f"{k}: {theirs.get(k)} here {ours.get(k)}" for k in changed[:3]))
            return False
        if folder.resolve() != working.resolve():
            _copy_kernels(folder)
        info = torch.compiler.load_cache_artifacts((folder / ARTIFACTS).read_bytes())
        if info is None:
            raise ValueError(f"{ARTIFACTS} holds no artifacts torch can read")
    except Exception as exc:  # noqa: BLE001  a corrupt bundle costs a recompile, never a failed setup
        log.warning("compile cache %s unusable (%s: %s); compiling from scratch", shown, type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "")
        return False
    counts = {kind: len(names) for kind, names in info.artifacts.items()}
    log.info("compile cache: loaded %s from %s in %.2fs", ", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing",
             shown, time.monotonic() - started)
    return True


def _copy_kernels(folder: Path) -> None:
    """A bundle's kernel files into inductor's and triton's live cache folders. A file already there is left alone:
    its name is its content's hash, and it may be a kernel library this process (or another) has loaded, which
    writing over would crash."""
    inductor, triton = _dirs()
    for name, dest in (("inductor", inductor), ("triton", triton)):
        if (folder / name).is_dir():
            shutil.copytree(folder / name, dest, dirs_exist_ok=True, copy_function=_copy_new)


def _copy_new(src: str, dst: str) -> None:
    if not os.path.exists(dst):
        tmp = f"{dst}.tmp-{os.getpid()}"
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def save(folder: Path, ours: dict) -> bool:
    """Write this process's compile artifacts and the manifest into the working folder (atomically)."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return False
    data, info = saved
    folder.mkdir(parents=True, exist_ok=True)
    manifest = dict(key=ours, digest=digest(ours), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    artifacts={kind: len(names) for kind, names in info.artifacts.items()})
    for name, content in ((ARTIFACTS, data), (MANIFEST, json.dumps(manifest, indent=1).encode())):
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(content)
        os.replace(tmp, folder / name)
    log.info("compile cache: saved %s to %s", ", ".join(f"{n} {k}" for k, n in manifest["artifacts"].items()), folder)
    return True


def export(working: Path, dest: Path) -> Path:
    """The working folder as a bundle at dest: a folder, or a .tar of one when dest ends in .tar."""
    if not (working / MANIFEST).is_file():
        raise SettingsError(f"nothing to export: {working} holds no compile bundle (boot with FLUX_COMPILE first).")
    inductor, triton = _dirs()
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=dest.parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        for name in (MANIFEST, ARTIFACTS):
            shutil.copy2(working / name, staged / name)
        if inductor.is_dir():
            shutil.copytree(inductor, staged / "inductor", ignore=lambda d, names: [
                n for n in names if Path(d) == inductor and n in _NOT_KERNELS])
        if triton.is_dir() and not triton.is_relative_to(inductor):
            shutil.copytree(triton, staged / "triton")
        if dest.suffix == ".tar":
            with tarfile.open(Path(tmp) / "bundle.tar", "w") as tar:
                for item in sorted(staged.iterdir()):
                    tar.add(item, arcname=item.name)
            os.replace(Path(tmp) / "bundle.tar", dest)
        else:
            if dest.exists():
                shutil.rmtree(dest)
            staged.rename(dest)
    return dest
