"""One transformer checkpoint in a single file, as a weights source of a variant loaded on first use: an https URL or
a local path of a `.safetensors` or `.sft` file in Black Forest Labs' key layout (`double_blocks.0.img_attn.qkv...`),
as BFL and Replicate's weights delivery publish FLUX.1-Kontext-dev and FLUX.1-Fill-dev, whose Hugging Face repos are
gated.

  fetched   an https file with flux/download.py (parallel ranged parts, limits, deadline, atomic) after a disk check
            for its announced size, into weights/url/<folder>/, marked `.complete` once its header was checked
  checked   its safetensors header (never a pickle: the file is read with safetensors only) and its architecture: the
            number of blocks, widths, input and output channels and guidance embedder must be the variant's
  read      its keys in diffusers' names (flux/bfl.py), loaded by diffusers' `from_single_file` with the variant's
            published diffusers config kept in this repo (flux/configs/<variant>/: no hub call), whose scheduler
            folder gives its scheduler. A checkpoint of a variant's tiny twin (flux/fakes/tiny.py, the tests' and
            CPU machines' FLUX) is read with the tiny twin's config instead: the only other architecture accepted.

The base variant cannot come from one: setup loads every shared component from its source (flux/weights.py).
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
from pathlib import Path
from urllib.parse import urlsplit

from . import bfl, variants
from . import download as dl
from .errors import WeightsError
from .fakes import tiny
from .folders import weights_dir

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".sft")
FILE, URL = "file", "file-url"  # the forms: a local file, an https one
CONFIGS = Path(__file__).resolve().parent / "configs"  # each variant's published diffusers config, by its name
MAX_HEADER_BYTES = 100 * dl.MiB  # safetensors' own bound on a header
_URL = re.compile(r"^https?://", re.IGNORECASE)


def form(source: str) -> str | None:
    """FILE, URL, or None when the source is not a single file."""
    if _URL.match(source):
        return URL if urlsplit(source).path.lower().endswith(SUFFIXES) else None
    path = Path(source).expanduser()
    return FILE if source.lower().endswith(SUFFIXES) and not path.is_dir() else None


def locate(source: str, dest: Path | None, kind: str, what: str, limits: dl.Limits) -> Path:
    """The checked file a single-file source names, an https one fetched into dest (once)."""
    variant = _variant(source, kind, what)
    if form(source) == FILE:
        path = _local(source, what)
        check(path, variant, what)
        return path
    return _fetch(source, dest, variant, what, limits)


def _variant(source: str, kind: str, what: str) -> variants.Variant:
    """The variant a single file is for; the base (or any other kind) refuses one."""
    variant = variants.VARIANTS.get(kind)
    if variant is None or variant.at_setup:
        raise WeightsError(f"{what}: {dl.shown(source)} is one transformer checkpoint, but this setting needs every "
                           f"component it loads: set it to a folder in diffusers format, a Hugging Face repo id or an "
                           f"https URL of a .tar of that folder. A single file serves the variants loaded on first "
                           f"use ({', '.join(v.setting for v in variants.ON_FIRST_USE)}).")
    return variant


def _local(source: str, what: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what}: the file {path} does not exist. Fix the setting.")
    return path


def _fetch(url: str, dest: Path, variant: variants.Variant, what: str, limits: dl.Limits) -> Path:
    name = Path(urlsplit(url).path).name
    if (dest / ".complete").is_file():
        return dest / name
    with dl.ranged(url, what=what, limits=limits) as (found, _, whole):
        dl.check_room(dest.parent, found.size or 0, what)
        path = whole(dest / name)
    try:
        check(path, variant, what)
    except WeightsError:
        path.unlink()  # never kept: the next boot fetches again
        raise
    (dest / ".complete").write_text(dl.redact(url))
    return path


def header(path: Path, what: str) -> dict[str, list[int]]:
    """The shape of every tensor of a safetensors file, its header checked against its length by safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  safetensors' errors are one Rust type, and OSError
        raise WeightsError(f"{what}: {path.name} is not a complete safetensors file ({str(exc)[:200]}): download "
                           "it again, or point the setting at a .safetensors file.") from None


def parse_header(raw: bytes, what: str, name: str) -> dict[str, list[int]]:
    """The shapes a safetensors header's bytes (its 8-byte length, then its JSON) announce."""
    try:
        tensors = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        return {k: list(v["shape"]) for k, v in tensors.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError, struct.error):
        raise WeightsError(f"{what}: {name} is not a safetensors file (its header does not parse).") from None


def architecture(shapes: dict[str, list[int]]) -> dict[str, object]:
    """What a BFL checkpoint's shapes say of its FluxTransformer2DModel."""
    shapes = {bfl.strip(k): v for k, v in shapes.items()}
    blocks = {kind: len({k.split(".")[1] for k in shapes if k.startswith(f"{kind}_blocks.")})
              for kind in ("double", "single")}
    return {"double blocks": blocks["double"], "single blocks": blocks["single"],
            "width": shapes["img_in.weight"][0], "input channels": shapes["img_in.weight"][1],
            "output channels": shapes["final_layer.linear.weight"][0], "text width": shapes["txt_in.weight"][1],
            "pooled text width": shapes["vector_in.in_layer.weight"][1],
            "guidance embedder": "guidance_in.in_layer.weight" in shapes}


def _of_config(folder: Path) -> dict[str, object]:
    c = json.loads((folder / "transformer" / "config.json").read_text())
    return {"double blocks": c["num_layers"], "single blocks": c["num_single_layers"],
            "width": c["num_attention_heads"] * c["attention_head_dim"], "input channels": c["in_channels"],
            "output channels": c["patch_size"] ** 2 * (c.get("out_channels") or c["in_channels"]),
            "text width": c["joint_attention_dim"], "pooled text width": c["pooled_projection_dim"],
            "guidance embedder": c["guidance_embeds"]}


def check(path: Path, variant: variants.Variant, what: str) -> Path:
    """The config folder a single file is read with, once its header and architecture are checked."""
    shapes = header(path, what)
    return config_for(shapes, variant, what, path.name)


def config_for(shapes: dict[str, list[int]], variant: variants.Variant, what: str, name: str) -> Path:
    """The variant's published config folder where a checkpoint's shapes are its architecture (its tiny twin's
    where they are that); a WeightsError saying what differs otherwise."""
    missing = [k for k in bfl.REQUIRED if k not in {bfl.strip(s) for s in shapes}]
    unknown = bfl.unknown(shapes)
    if missing or unknown:
        raise WeightsError(f"{what}: {name} is not a FLUX.1 transformer checkpoint in Black Forest Labs' layout ("
                           + (f"no {', '.join(missing[:3])}" if missing else f"unknown keys {', '.join(unknown[:3])}")
                           + f"). Point {variant.setting} at {variant.title}'s single-file transformer.")
    try:
        found = architecture(shapes)
    except (IndexError, TypeError):
        raise WeightsError(f"{what}: {name} is not a FLUX.1 transformer checkpoint: its embedders are not matrices. "
                           f"Point {variant.setting} at {variant.title}'s single-file transformer.") from None
    published = CONFIGS / variant.name
    if found == _of_config(published):
        return published
    twin = tiny.ensure_config(weights_dir() / "tiny" / f"{variant.title} config", variant)
    if found == _of_config(twin):
        return twin
    differs = {folder: [f"{k} {found[k]}, not {v}" for k, v in _of_config(folder).items() if found[k] != v]
               for folder in (published, twin)}
    nearest = min(differs, key=lambda folder: len(differs[folder]))  # a tiny twin is told what its twin differs in
    config = f"flux/configs/{variant.name}" if nearest == published else "its tiny twin's"
    raise WeightsError(f"{what}: {name} is not {variant.title}'s transformer: {'; '.join(differs[nearest])} (the "
                       f"config: {config}). Point {variant.setting} at {variant.title}'s checkpoint.")


def read(located: Path, variant: variants.Variant, dtype):
    """A variant's transformer (in `dtype`) and scheduler from where its weights were located: a diffusers folder,
    or one single-file checkpoint (its config folder chosen by `check`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if not located.is_file():
        return (FluxTransformer2DModel.from_pretrained(located, subfolder="transformer", dtype=dtype,
                                                       use_safetensors=True),
                FlowMatchEulerDiscreteScheduler.from_pretrained(located, subfolder="scheduler"))
    from safetensors.torch import load_file

    config = check(located, variant, f"{variant.name} weights")
    # diffusers' converter assumes FLUX.1's width (flux/bfl.py): the keys arrive in its names, which it takes as is
    transformer = FluxTransformer2DModel.from_single_file(bfl.to_diffusers(load_file(located)), config=str(config),
                                                          subfolder="transformer", local_files_only=True, dtype=dtype)
    log.info("%s: %s read as one BFL checkpoint, with the config of %s", variant.name, located.name, config)
    return transformer, FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler")


def survey(source: str, kind: str, what: str, limits: dl.Limits) -> tuple[int, dict[str, object]]:
    """A single file's size and the architecture its header announces (checked as a boot checks it), an https one's
    header read with ranged reads of it only."""
    variant = _variant(source, kind, what)
    if form(source) == FILE:
        path = _local(source, what)
        shapes, size, name = header(path, what), path.stat().st_size, path.name
    else:
        size, shapes, name = *_remote_header(source, what, limits), Path(urlsplit(source).path).name
    config_for(shapes, variant, what, name)
    return size, architecture(shapes)


def _remote_header(url: str, what: str, limits: dl.Limits) -> tuple[int, dict[str, list[int]]]:
    """An https safetensors file's size and tensor shapes, from two ranged reads: its header's length, its header."""
    name = Path(urlsplit(url).path).name
    with dl.ranged(url, what=what, limits=limits) as (found, fetch, _):
        if not found.ranges:
            raise WeightsError(f"{dl.shown(url)} does not take byte ranges: its header cannot be read without "
                               "downloading all of it, which a boot would do")
        raw = bytearray()
        never = threading.Event()  # each read runs to its end

        def read_bytes(first: int, last: int) -> None:
            fetch(first, last, lambda offset, chunk: raw.extend(chunk), never)

        read_bytes(0, 7)
        length = struct.unpack("<Q", bytes(raw))[0] if len(raw) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, (found.size or 0) - 8):
            raise WeightsError(f"{what}: {name} is not a safetensors file (its header's length does not fit).")
        read_bytes(8, 8 + length - 1)
    return found.size or 0, parse_header(bytes(raw), what, name)
