"""The LoRA layouts this loader reads, one class each: how its keys are told apart and how they are read as Deltas.

A layout is a subclass of `Layout` with a `name` (the logs', `LoraWeights.layout`), a `detect(keys, metadata)` and a
`read(tensors, header, shown)`; defining it registers it. Layouts are tried in the order they are defined here (the
order follows diffusers' own detection: the first that claims a file reads it), so a layout whose keys another's
test would also match comes before that one. What is listed for users derives from the registry: `FORMATS` (the
error messages) from each layout's `title`, predict.py's description (a literal: tests/test_schema.py checks it names
each layout's `family`). Most layouts are read by diffusers' converters (`LowRank`); LyCORIS and OneTrainer files
module by module (`PerModule`). Adding a layout: one class here, plus its tests (a zoo entry, tests/test_lora_zoo.py).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from . import LoraError, short
from .delta import COMPONENTS, TRANSFORMER, Delta
from .keymaps import (BFL_ROOTS, LYCORIS, LYCORIS_UNSUPPORTED, TRANSFORMER_ROOTS, bfl_to_comfy, lycoris_suffix,
                      lycoris_targets, strip_bfl_prefix)
from .scaling import adapter_metadata, scales

log = logging.getLogger(__name__)


class Layout:
    """One layout. A subclass that sets `name` is registered (in `LAYOUTS`, in the order of definition); one that
    does not is a reader shared by several layouts."""

    name: ClassVar[str]  # how the logs and LoraWeights.layout name it
    title: ClassVar[str | None] = None  # how FORMATS lists it (None: listed under another layout's title)
    family: ClassVar[str | None] = None  # how predict.py's description names it (None: not named there)
    refused: ClassVar[str | None] = None  # why this loader refuses the layout (a message, after the file's name)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            LAYOUTS.append(cls)

    @classmethod
    def detect(cls, keys: list[str], metadata: dict | None) -> bool:
        raise NotImplementedError

    @classmethod
    def read(cls, tensors: dict, header: dict, shown: str) -> dict[str, Delta]:
        raise NotImplementedError


LAYOUTS: list[type[Layout]] = []


class LowRank(Layout):
    """Low-rank pairs in any key names diffusers' FLUX converters read (`FluxPipeline.lora_state_dict`), as one
    "lora" Delta per module, scaled as PEFT would."""

    @classmethod
    def for_diffusers(cls, tensors: dict) -> dict:
        """The tensors as diffusers' converters are given them (renamed where they only read another form)."""
        return tensors

    @classmethod
    def read(cls, tensors: dict, header: dict, shown: str) -> dict[str, Delta]:
        from diffusers import FluxPipeline
        from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                     convert_unet_state_dict_to_peft)

        config = adapter_metadata(header, shown)
        source = cls.for_diffusers(dict(tensors))  # diffusers' converters pop what they convert
        try:
            state_dict, alphas = FluxPipeline.lora_state_dict(source, return_alphas=True)
            state_dict = {("transformer." + k if k.startswith(TRANSFORMER_ROOTS) else k): v for k, v in state_dict.items()}
            alphas = {("transformer." + k if k.startswith(TRANSFORMER_ROOTS) else k): v for k, v in (alphas or {}).items()}
            parts = {}
            for component in COMPONENTS:
                part = {k[len(component) + 1:]: v for k, v in state_dict.items() if k.startswith(component + ".")}
                if part and not any(".lora_A." in k for k in part):
                    part = (convert_unet_state_dict_to_peft(part) if component == TRANSFORMER
                            else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)))
                parts[component] = part
        except MemoryError:
            raise
        except Exception as exc:  # diffusers' converters fail with whatever the keys trip: the user gets the keys
            log.info("lora: %s: diffusers' converter for the %s layout failed (%s)", shown, cls.name, type(exc).__name__)
            what = f"a {cls.name} LoRA" if cls.name != "unknown" else "a LoRA"
            raise LoraError(
                f"{shown} looks like {what} but its keys do not fit FLUX.1 "
                f"(e.g. {', '.join(short(k) for k in list(tensors)[:4])}): "
                f"it was made for a different model, or is damaged. This loader reads FLUX LoRAs in these layouts: "
                f"{FORMATS}."
            ) from None
        leftover = [k for k in state_dict if not k.startswith(tuple(c + "." for c in COMPONENTS))]
        if leftover or not any(parts.values()):
            raise unreadable(shown, leftover or list(tensors))
        deltas = {}
        for component, part in parts.items():
            modules = _pairs(part, component, shown)
            for module, scale in scales(component, modules, config, alphas, shown).items():
                a, b = modules[module]
                deltas[f"{component}.{module}"] = Delta("lora", {"lora_up": b, "lora_down": a}, scale, f"{component}.{module}")
        return deltas


_PAIR = {".lora_A.weight": 0, ".lora_B.weight": 1}


def _pairs(part: dict, component: str, shown: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from PEFT keys; anything else in the file (a bias, a full weight) is refused by name."""
    found: dict[str, list] = {}
    for key, value in part.items():
        suffix = next((s for s in _PAIR if key.endswith(s)), None)
        if suffix is None:
            what = ("a bias for lora_B (PEFT's lora_bias), which this loader does not apply" if key.endswith(".lora_B.bias")
                    else "a weight that is not part of a low-rank pair (lora_A / lora_B): a LoRA changes layers only "
                    "through such pairs")
            raise LoraError(f"{shown} holds {component}.{short(key)}, {what}. Use a LoRA of low-rank pairs only.")
        found.setdefault(key[: -len(suffix)], [None, None])[_PAIR[suffix]] = value
    incomplete = [m for m, (a, b) in found.items() if a is None or b is None]
    if incomplete:
        raise LoraError(f"{shown} is not a valid LoRA: {component}.{short(incomplete[0])} lacks a matching "
                        "lora_A/lora_B pair.")
    return {m: (a, b) for m, (a, b) in found.items()}


class PerModule(Layout):
    """A file whose modules each carry their own factors and alpha as one Delta per diffusers module, checked to be
    complete and consistent: LyCORIS (LoKr, LoHa, with LoRA pairs mixed in) and OneTrainer's LoRAs
    (`lora_transformer_<diffusers module>` on every Linear, CLIP as `lora_te1_`: OneTrainer names each LoRA module
    after its path in the diffusers model, `.` as `_`, as its FLUX LoRA saver writes them). Each module's change is
    scale * its factors' product with scale alpha / rank, as LyCORIS and OneTrainer apply it (diffusers' converter for
    these names appends a submodule only for attention, so every other module would collapse onto its block)."""

    @classmethod
    def read(cls, tensors: dict, header: dict, shown: str) -> dict[str, Delta]:
        grouped: dict[str, dict[str, object]] = {}
        for name, value in tensors.items():
            suffix = lycoris_suffix(name)
            if suffix is None:
                raise unreadable(shown, [name], f"looks like a LyCORIS file but {short(name)!r} is no LoKr, LoHa or "
                                 "LoRA tensor")
            grouped.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
        deltas = {}
        for module, parts in grouped.items():
            unsupported = [LYCORIS_UNSUPPORTED[s] for s in parts if s in LYCORIS_UNSUPPORTED]
            if unsupported:
                raise LoraError(f"{shown}: {short(module)} uses {unsupported[0]}, which this loader does not apply to "
                                "FLUX's linear layers.")
            what = next((k for k, names in LYCORIS.items() if any(s in parts for s in names)), None)
            if what is None:
                continue  # an alpha alone
            targets = lycoris_targets(module)
            if targets is None:
                raise unreadable(shown, [module], f"is a {cls.name} file for another model: {short(module)!r} names "
                                 "no layer FLUX.1 has")
            factors = {s.removesuffix(".weight"): v for s, v in parts.items() if s in LYCORIS[what]}
            unit = Delta(what, factors, 1.0, module)
            problem = unit.problem()
            if problem:
                raise LoraError(f"{shown} is not a valid {cls.name} file: {short(module)} {problem}.")
            rank = unit.rank
            alpha = parts.get("alpha")
            alpha = float(alpha) if alpha is not None and float(alpha) != 0 else None
            if what == "lokr" and not any(f in factors for f in ("lokr_w1_a", "lokr_w2_a")):
                scale = 1.0  # both factors full: LyCORIS applies no alpha
            else:
                scale = alpha / rank if alpha is not None else 1.0
            out = unit.product_shape[0]
            for index, (name, shares, swap) in enumerate(targets):
                rows = None
                if shares:
                    if out % sum(shares):
                        raise LoraError(f"{shown}: {short(module)} changes {out} rows, which do not split into "
                                        f"{', '.join(n.rsplit('.', 1)[-1] for n, _, _ in targets)} as FLUX.1's do.")
                    unit = out // sum(shares)
                    start = sum(shares[:index]) * unit
                    rows = ((start, start + shares[index] * unit),)
                elif swap:
                    if out % 2:
                        raise LoraError(f"{shown}: {short(module)} changes {out} rows, an odd number for FLUX.1's final "
                                        "modulation (shift and scale).")
                    rows = ((out // 2, out), (0, out // 2))
                deltas[name] = Delta(what, factors, scale, module, rows)
        if not deltas:
            raise unreadable(shown, list(tensors), "looks like a LyCORIS file but holds no module to apply")
        return deltas


class Bfl(LowRank):
    """BFL's module names (fused qkv / linear1): diffusers reads them in ComfyUI's form (`diffusion_model.` with
    lora_down/lora_up), which works at any model size; other prefixes and PEFT's lora_A/lora_B are renamed to it."""

    family = "BFL (ComfyUI, fal)"

    @classmethod
    def for_diffusers(cls, tensors: dict) -> dict:
        if any(k.startswith("diffusion_model.") and ".lora_down." in k for k in tensors):
            return tensors
        return bfl_to_comfy(tensors)


# ----- the registry, in the order layouts are tried -----------------------------------------------------------------

def _lycoris_kinds(keys: list[str]) -> set[str]:
    return {kind for k in keys for kind, names in LYCORIS.items() if kind != "lora" and lycoris_suffix(k) in names}


class LoKr(PerModule):
    """LyCORIS LoKr: kron(w1, w2), each factor full or a product (kohya's BFL names, LyCORIS' diffusers names)."""

    name, title, family = "lokr", "LyCORIS LoKr and LoHa", "LyCORIS LoKr and LoHa"

    @classmethod
    def detect(cls, keys, metadata):
        return _lycoris_kinds(keys) == {cls.name}


class LoHa(LoKr):
    """LyCORIS LoHa: (w1_a @ w1_b) * (w2_a @ w2_b)."""

    name, title = "loha", None


class LyCORIS(LoKr):
    """LoKr and LoHa modules in one file."""

    name, title = "lycoris", None

    @classmethod
    def detect(cls, keys, metadata):
        return len(_lycoris_kinds(keys)) > 1


class Fal(Bfl):
    """fal's trainer: BFL names with PEFT's lora_A/lora_B under PEFT's wrapper prefix (`base_model.model.`)."""

    name = "fal"

    @classmethod
    def detect(cls, keys, metadata):
        return any(k.startswith("base_model.model.") and strip_bfl_prefix(k).startswith(BFL_ROOTS) for k in keys)


class OneTrainer(PerModule):
    """OneTrainer: `lora_transformer_<diffusers module>` (`.` as `_`) on every Linear, kohya-style lora_down/lora_up
    and alpha (so predict.py counts it with kohya); CLIP as `lora_te1_`."""

    name, title, family = "onetrainer", "OneTrainer", "kohya"

    @classmethod
    def detect(cls, keys, metadata):
        return any(k.startswith("lora_transformer_") for k in keys)


class Kohya(LowRank):
    """kohya/sd-scripts: `lora_unet_<BFL module>` (`.` as `_`), lora_down/lora_up and alpha; CLIP as `lora_te1_`."""

    name, title, family = "kohya", "kohya/sd-scripts", "kohya"

    @classmethod
    def detect(cls, keys, metadata):
        return any(k.startswith(("lora_unet_", "lora_te")) for k in keys)


class ComfyUI(Bfl):
    """BFL names as ComfyUI saves them: `diffusion_model.<BFL module>.lora_down.weight`."""

    name = "bfl"

    @classmethod
    def detect(cls, keys, metadata):
        return any(".lora_down.weight" in k for k in keys) and any(k.startswith("diffusion_model.") for k in keys)


class XLabs(LowRank):
    """XLabs: `double_blocks.<n>.processor.qkv_lora1.down.weight`."""

    name, title, family = "xlabs", "XLabs", "XLabs"

    @classmethod
    def detect(cls, keys, metadata):
        return any("processor" in k for k in keys)


class BflControl(Layout):
    """FLUX Control LoRAs (Canny/Depth): they need a control image; refused."""

    name = "bfl-control"
    refused = "is a FLUX Control LoRA (Canny/Depth): it needs a control image, which this model does not take."

    @classmethod
    def detect(cls, keys, metadata):
        return any("query_norm.scale" in k for k in keys)


class BflPeft(Bfl):
    """BFL names with PEFT's lora_A/lora_B (BFL's own trainer), with or without a prefix."""

    name = "bfl-peft"

    @classmethod
    def detect(cls, keys, metadata):
        return any(strip_bfl_prefix(k).startswith(BFL_ROOTS) for k in keys) and any(".lora_A." in k for k in keys)


class BflNative(Bfl):
    """BFL names with lora_down/lora_up under any other prefix (or none)."""

    name, title = "bfl", "BFL-native (ComfyUI, BFL's and fal's trainers)"

    @classmethod
    def detect(cls, keys, metadata):
        return any(strip_bfl_prefix(k).startswith(BFL_ROOTS) for k in keys)


class Diffusers(LowRank):
    """diffusers/PEFT: `transformer.<module>.lora_A.weight`, PEFT's adapter config in the header."""

    name, family = "diffusers", "diffusers/PEFT"
    title = "diffusers/PEFT, PEFT's own base_model.model. keys"  # the wrapper prefix is read in flux/lora/formats.py

    @classmethod
    def detect(cls, keys, metadata):
        return bool(metadata and "lora_adapter_metadata" in metadata) and AiToolkit.detect(keys, metadata)


class AiToolkit(LowRank):
    """ai-toolkit (Replicate's and ostris' trainer): diffusers' names, no adapter config."""

    name, title, family = "ai-toolkit", "ai-toolkit", "ai-toolkit"

    @classmethod
    def detect(cls, keys, metadata):
        return any(k.startswith(("transformer.", "text_encoder.")) for k in keys)


class Unknown(LowRank):
    """None of the above: diffusers decides (its converters refuse what they cannot read)."""

    name = "unknown"

    @classmethod
    def detect(cls, keys, metadata):
        return True


def detect(keys: list[str], metadata: dict | None) -> type[Layout]:
    """The layout a LoRA file is written in: the first in `LAYOUTS` that claims its keys (`Unknown` claims any)."""
    return next(kind for kind in LAYOUTS if kind.detect(keys, metadata))


def layout(keys: list[str], metadata: dict | None) -> str:
    """The name of the layout a LoRA file is written in, for the logs."""
    return detect(keys, metadata).name


# What error messages list: each layout's title, the most general first (the reverse of the order they are tried).
FORMATS = ", ".join(kind.title for kind in reversed(LAYOUTS) if kind.title)


def unreadable(shown: str, keys: list[str], why: str = "") -> LoraError:
    """What the file holds and what is accepted; `why` says what was recognised, if anything."""
    if why:
        return LoraError(f"{shown} {why} (its keys look like {', '.join(short(k) for k in keys[:4])}). This loader "
                         f"reads FLUX LoRAs in these layouts: {FORMATS}.")
    return LoraError(
        f"{shown} is not a FLUX LoRA in any layout this loader reads ({FORMATS}): its keys look like "
        f"{', '.join(short(k) for k in keys[:4])}. Use a LoRA trained for FLUX.1-dev, as a .safetensors file in one "
        "of these layouts."
    )
