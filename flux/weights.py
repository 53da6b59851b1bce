"""Where the model weights come from, and getting them onto local disk under weights/.

One setting per component names its source; the same forms work for each:
  - `tiny`: the tiny random-weight FLUX built by flux/fakes/tiny.py (no download)
  - `public`: the component's public default (below), on any machine
  - a local folder holding the component in diffusers format
  - a Hugging Face repo id (`owner/name`), downloaded in parallel with HF_TOKEN
  - an https URL of a .tar of that folder: only the members its layout needs are fetched, in parallel ranged parts
  - for a variant loaded on first use, one transformer checkpoint in Black Forest Labs' layout: an https URL or a
    local path of a .safetensors or .sft file (flux/singlefile.py)

The public defaults need no token (a Replicate model has no secrets): each FLUX variant's .tar on Replicate's weights
delivery (flux/variants.py: `public`, diffusers layout), and the safety checkers' public Hugging Face repos (both hold
model.safetensors and are not gated; Replicate's safety tars were not used: what they hold could not be checked, and
their loaders accept pickles, which this container never loads).

Settings (environment):
  each FLUX variant's setting (flux/variants.py)  its weights   default: its public .tar on a GPU, tiny without one:
      FLUX_WEIGHTS (or cog's COG_WEIGHTS)          FLUX.1-dev, the base: every shared component; `public` selects
                                                   every default a GPU would use, on any machine
      FLUX_SCHNELL_WEIGHTS, FLUX_KREA_DEV_WEIGHTS,  the variants loaded on first use: transformer and scheduler
      FLUX_KONTEXT_DEV_WEIGHTS, FLUX_FILL_DEV_WEIGHTS  (kontext-dev's and fill-dev's defaults: single-file checkpoints)
      (any variant other than the base is tiny when the base is tiny)
  FLUX_SAFETY_CHECKER                  CompVis safety checker  default: its HF repo, or tiny when dev is tiny
  FLUX_SAFETY_SECOND                   second opinion on flagged images (or off)  default: Falconsai's HF repo,
                                       or tiny when dev is tiny
  FLUX_WEIGHTS_HOST                    replaces the host of every default: the .tars' (PUBLIC_HOST), and the
                                       Hugging Face endpoint of the default safety checkers (a mirror serving both)
  FLUX_WEIGHTS_DIR                     where downloads land    default: weights/ beside predict.py

Nothing already complete on disk is fetched again: a finished download leaves a
`.complete` marker and is used as is on the next boot, with no network call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import download as dl
from .download import shown
from . import netguard, progress, singlefile, tarstream, variants
from .fakes import tiny
from .folders import weights_dir
from .errors import UserError, WeightsError

log = logging.getLogger(__name__)

SAFETY_REPO = "CompVis/stable-diffusion-safety-checker"
SAFETY_SECOND_REPO = "Falconsai/nsfw_image_detection"
SAFETY = "safety"
SAFETY_SECOND = "safety-second"
OFF = "off"
TINY = "tiny"
PUBLIC = "public"

SAFETY_FILES = ["config.json", "preprocessor_config.json", "model.safetensors"]
COMPILE_CACHE = "compile-cache"  # a compile bundle (flux/compile_cache.py) comes in the same forms as the weights
# kind -> the files fetched of a repo (None: all), and what a folder must hold. A variant's kind is its name.
PATTERNS = {**{v.name: list(v.files) for v in variants.VARIANTS.values()}, SAFETY: SAFETY_FILES,
            SAFETY_SECOND: SAFETY_FILES, COMPILE_CACHE: None}
# a safety checker is loaded from model.safetensors only (never a pickle): a source without it does not hold
LAYOUT = {**{v.name: list(v.layout) for v in variants.VARIANTS.values()}, SAFETY: ["config.json", "model.safetensors"],
          SAFETY_SECOND: ["config.json", "model.safetensors"], COMPILE_CACHE: []}  # compile_cache.load checks its own
MAX_TAR_BYTES = 64 * 1024**3
# A weights .tar: its members' bytes in ranged parts of 32 MiB, 16 at a time, each written in place as it arrives.
TAR_LIMITS = dl.Limits(max_bytes=MAX_TAR_BYTES, part_size=32 * dl.MiB, workers=16)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Sources:
    variants: dict[str, str]  # each FLUX variant's weights, by name (flux/variants.py)
    safety: str
    safety_second: str | None = None  # None: off
    # kind -> the Hugging Face endpoint of a default repo moved by FLUX_WEIGHTS_HOST (others: HF_ENDPOINT's)
    endpoints: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """The base variant's weights (setup loads them: every shared component)."""
        return self.variants[variants.BASE.name]

    @property
    def tiny(self) -> bool:
        return self.base == TINY


def sources(has_cuda: bool, env: dict[str, str] | None = None) -> Sources:
    """The configured source of each component, defaults filled in."""
    env = os.environ if env is None else env
    host = (env.get("FLUX_WEIGHTS_HOST") or "").strip().rstrip("/") or None
    base = variants.BASE
    chosen = env.get(base.setting) or env.get("COG_WEIGHTS") or (PUBLIC if has_cuda else TINY)
    fallback_tiny = chosen == TINY

    def variant(v: variants.Variant) -> str:
        value = chosen if v is base else env.get(v.setting) or (TINY if fallback_tiny else PUBLIC)
        return public_url(v, host) if value == PUBLIC else value

    safety = env.get("FLUX_SAFETY_CHECKER") or (TINY if fallback_tiny else SAFETY_REPO)
    second = env.get("FLUX_SAFETY_SECOND") or (TINY if fallback_tiny else SAFETY_SECOND_REPO)
    defaults = {SAFETY: (safety, SAFETY_REPO), SAFETY_SECOND: (second, SAFETY_SECOND_REPO)}
    return Sources(
        variants={v.name: variant(v) for v in variants.VARIANTS.values()},
        safety=SAFETY_REPO if safety == PUBLIC else safety,
        safety_second=_off_or(SAFETY_SECOND_REPO if second == PUBLIC else second),
        endpoints={kind: host for kind, (value, repo) in defaults.items() if host and value in (PUBLIC, repo)},
    )


def public_url(variant: variants.Variant, host: str | None = None) -> str:
    """A variant's public .tar, on `host` (FLUX_WEIGHTS_HOST) instead of Replicate's weights delivery if given."""
    return (host or variants.PUBLIC_HOST) + variant.public


def _off_or(source: str) -> str | None:
    return None if source.strip().lower() == OFF else source


def locate(source: str, kind: str, endpoint: str | None = None) -> Path:
    """A local folder holding the component named by source, fetching it if needed.

    kind is a variant's name (flux/variants.py), "safety", "safety-second" or "compile-cache": it picks the tiny build
    and the files to fetch. endpoint: the Hugging Face endpoint of a repo id (Sources.endpoints; None: HF_ENDPOINT's).
    """
    started = time.monotonic()
    form, dest = form_of(source, kind)
    if form == "tiny":
        path = _tiny(weights_dir(), kind)
    elif form == "url":
        path = _from_tar_url(source, dest, kind)
    elif form in (singlefile.FILE, singlefile.URL):
        path = singlefile.locate(source, dest, kind, what_of(kind), TAR_LIMITS)
    elif form == "hub":
        path = _from_hub(source, dest, kind, endpoint)
    elif form == "folder":
        path = Path(source).expanduser()
        if not path.is_dir():
            raise WeightsError(f"{what_of(kind)}: the folder {path} does not exist. Fix the setting or download them first.")
    else:
        raise unknown_form(source, kind)
    _check_layout(path, kind, source)
    log.info("weights %s: %s ready in %.2fs", kind, shown(source), time.monotonic() - started)
    return path


def unknown_form(source: str, kind: str) -> WeightsError:
    return WeightsError(f"{what_of(kind)}: {source!r} is not a folder, a Hugging Face repo id (owner/name), an https URL "
                        "of a .tar, a .safetensors file (or its https URL), 'public' or 'tiny'.")


def form_of(source: str, kind: str) -> tuple[str, Path | None]:
    """What a source is ("tiny", "url": an https .tar, "hub": a Hugging Face repo id that is not a local folder,
    "folder", "file" or "file-url": a single-file checkpoint, or "invalid"), and for those fetched the folder under
    weights/ they land in."""
    if source == TINY and kind != COMPILE_CACHE:
        return "tiny", None
    if single := singlefile.form(source):
        return single, (weights_dir() / "url" / _url_folder(source) if single == singlefile.URL else None)
    if source.startswith(("https://", "http://")):
        return "url", weights_dir() / "url" / _url_folder(source)
    if Path(source).expanduser().is_dir() or source.startswith(("/", "./", "../", "~")):
        return "folder", None
    if not _REPO_ID.match(source):
        return "invalid", None
    return "hub", weights_dir() / "hf" / source.replace("/", "--")


def download_folder(source: str, kind: str) -> Path | None:
    """Where a source that is fetched (an https .tar, a Hugging Face repo id that is not a local folder) lands under
    weights/; None for the others (tiny, a local folder)."""
    return form_of(source, kind)[1]


def needs_download(source: str, kind: str) -> bool:
    dest = download_folder(source, kind)
    return dest is not None and not (dest / ".complete").is_file()


def check_disk(kind: str, need: int) -> None:
    """A UserError when the disk under weights/ has less room than a download of `need` bytes takes (with 1 GiB to
    spare), before anything is fetched."""
    dl.check_room(weights_dir(), need, what_of(kind))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under a folder (what a download has written so far)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


class Prefetch:
    """The weights of the variants loaded on first use, fetched in the background once setup is done (FLUX_PREFETCH),
    one at a time in table order, each after a disk check; only what must be downloaded (tiny and local folders are
    read on first use, as before). A request that needs a variant before its weights have arrived waits for them
    (`folder`), logging what has arrived; a fetch that failed fails the request that waited for it with the fetch's
    message, and the next request that needs the variant fetches it again itself."""

    def __init__(self, sources: dict[str, str], names, need: Callable[[str], int]):
        """names: the variants loaded on first use; need: a variant -> the bytes its download takes on disk, about
        (for the disk check, asked only for what is fetched)."""
        self._sources = sources
        self._need = need
        self._done = {name: threading.Event() for name in names if needs_download(sources[name], name)}
        self._results: dict[str, Path | Exception] = {}
        self._reported: set[str] = set()  # failures handed to a request: the next one fetches again itself
        self._thread = threading.Thread(target=self._fetch_all, name="flux-prefetch", daemon=True)

    @property
    def names(self) -> list[str]:
        """The variants it fetches."""
        return list(self._done)

    def start(self) -> "Prefetch":
        if self._done:
            log.info("weights: fetching %s in the background", ", ".join(shown(self._sources[n]) for n in self._done))
            self._thread.start()
        return self

    def _fetch_all(self) -> None:
        for name, done in self._done.items():
            try:
                check_disk(name, self._need(name))
                self._results[name] = locate(self._sources[name], name)
            except Exception as exc:  # noqa: BLE001  handed to the request that needs it
                log.warning("weights %s: the background fetch failed: %s", name, exc)
                self._results[name] = exc
            finally:
                done.set()

    def folder(self, name: str) -> Path | None:
        """A variant's weights once its background fetch is done (waiting for it); None when it is not fetched here
        (the caller locates it itself)."""
        done = self._done.get(name)
        if done is None or name in self._reported:
            return None
        dest, started = download_folder(self._sources[name], name), time.monotonic()

        def arrived() -> str:  # in its folder, or in the staging folder beside it that becomes it
            return progress.human_bytes(sum(folder_bytes(f) for f in dest.parent.glob(f"*{dest.name}*")))

        if not done.is_set():
            log.info("weights %s: waiting for the background download (%s arrived so far)", name, arrived())
        while not done.wait(10):
            log.info("weights %s: waiting for the background download: %s arrived, %.0fs", name, arrived(),
                     time.monotonic() - started)
        result = self._results[name]
        if isinstance(result, Exception):
            self._reported.add(name)  # reported once: the next request fetches again
            raise result
        return result


def read(located: Path, variant: variants.Variant, dtype):
    """A variant's transformer (in dtype) and scheduler from where `locate` found its weights: a diffusers folder or
    a single-file checkpoint (flux/singlefile.py); a failure to read them is a WeightsError."""
    with loading(variant.name, located):
        return singlefile.read(located, variant, dtype)


@contextlib.contextmanager
def loading(kind: str, path: Path):
    """Turn a failure to load weights from disk (corrupt, truncated, wrong format) into a WeightsError."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # safetensors, diffusers and transformers raise many types for a bad file
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        layout = "a FLUX.1 transformer in BFL's layout" if path.is_file() else "FLUX in diffusers format"
        raise WeightsError(
            f"{what_of(kind)} in {path} could not be loaded ({type(exc).__name__}: {detail}). The files are incomplete, "
            f"corrupt or not {layout}: download them again (delete the folder if it is a download under "
            f"{weights_dir()}) or fix the setting."
        ) from exc


def what_of(kind: str) -> str:
    if kind == SAFETY_SECOND:
        return "second safety checker (FLUX_SAFETY_SECOND) weights"
    return "compile bundle" if kind == COMPILE_CACHE else f"{kind} weights"


def _tiny(root: Path, kind: str) -> Path:
    if kind == SAFETY:
        return tiny.ensure_safety_checker(root / "tiny" / "safety-checker")
    if kind == SAFETY_SECOND:
        return tiny.ensure_nsfw_classifier(root / "tiny" / "nsfw-classifier")
    variant = variants.get(kind)
    return tiny.ensure_pipeline(root / "tiny" / variant.title, variant)


def _check_layout(path: Path, kind: str, source: str) -> None:
    missing = [n for n in LAYOUT[kind] if not path.is_file() and not (path / n).exists()]
    if missing:
        raise WeightsError(
            f"{what_of(kind)} at {shown(source)} are incomplete or not in diffusers format: missing {', '.join(missing)}."
        )


def _url_folder(url: str) -> str:
    """The folder a URL (a .tar, a single file) lands in: its file name, and a hash of the whole URL (query included: two URLs that
    differ only there are two downloads; the hash keeps a signature out of the name)."""
    name = Path(dl.redact(url)).name.removesuffix(".tar") or "weights"
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _from_hub(repo_id: str, dest: Path, kind: str, endpoint: str | None = None) -> Path:
    if (dest / ".complete").is_file():
        return dest
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = PATTERNS[kind]
    token = os.environ.get("HF_TOKEN") or None
    netguard.install_for_huggingface_hub()
    log.info("weights %s: downloading %s from Hugging Face into %s", kind, repo_id, dest)
    try:
        snapshot_download(
            repo_id, local_dir=dest, allow_patterns=patterns, token=token, max_workers=16,
            tqdm_class=progress.HubBytes.named(what_of(kind)),  # bytes, percent and rate in the setup log
            endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None,  # read per call: a mirror set at run time
        )
    except GatedRepoError:
        raise WeightsError(
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id} with your account, "
            "then set HF_TOKEN to a token of that account."
            + ("" if token else " HF_TOKEN is not set.")
        ) from None
    except RepositoryNotFoundError:
        raise WeightsError(
            f"{repo_id} was not found on Hugging Face (or is private and HF_TOKEN cannot read it). Check the setting."
        ) from None
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"Could not reach Hugging Face to download {repo_id}: check the network, or point the setting at a local folder."
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise WeightsError(f"Downloading {repo_id} from Hugging Face failed (HTTP {status}).") from None
    (dest / ".complete").write_text(repo_id)
    return dest


def _from_tar_url(url: str, dest: Path, kind: str) -> Path:
    """What the layout needs of the .tar at url (flux/tarstream.py: only those members are fetched) in a staging
    folder beside dest, which becomes dest, marked complete, only once everything arrived and was checked."""
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}-*"):  # staging left by an interrupted boot
        log.info("weights %s: removing %s, left by an interrupted download", kind, stale.name)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as tmp:
        unpacked = Path(tmp) / "unpacked"
        tarstream.extract_url(url, unpacked, max_bytes=MAX_TAR_BYTES, what=what_of(kind), limits=TAR_LIMITS,
                              wanted=PATTERNS[kind])
        root = _single_root(unpacked)
        (root / ".complete").write_text(dl.redact(url))
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
    return dest


def _single_root(folder: Path) -> Path:
    """Archives often hold one top folder; use it when they do."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not (folder / "model_index.json").exists():
        return entries[0]
    return folder
