"""LoRA files read as per-layer factors: every layout, one form (`LoraWeights`: a `Delta` per module).

A `Delta` keeps a module's weight change as the factors it was trained as (a low-rank pair B @ A; a LyCORIS
Kronecker or Hadamard product) and the scale its file gives it (alpha / rank, as PEFT would scale it); `problem()`
says why one cannot be fused (not matrices of finite numbers that multiply out, rank 0, a scale that is not finite).

`normalize` reads a .safetensors file. Its factors are read in float32 (fp8, fp16 and bf16 ones too) before any check
or product; T5 factors (kohya's lora_te3_, OneTrainer's lora_te2_, ComfyUI's t5xxl) are set aside, named in the log
and counted (`LoraWeights.unapplied`); PEFT's wrapper prefix (`base_model.model.`, SimpleTuner's
`transformer.base_model.model.`) is removed. diffusers' FluxLoraLoaderMixin converters then turn the key names of the
layouts in use (diffusers/PEFT, ai-toolkit, kohya/sd-scripts, XLabs, BFL-native as ComfyUI writes it) into
diffusers/PEFT keys, and each lora_A/lora_B pair becomes a Delta. The adapter metadata is read for the scaling
numbers only, each checked: nothing in a file configures the serving model. What diffusers cannot do for FLUX.1 is
routed here: BFL names with PEFT's lora_A/lora_B (BFL's own trainer, and fal's under `base_model.model.`) go to the
ComfyUI form diffusers converts at any size; LyCORIS LoKr/LoHa files and OneTrainer's LoRAs (diffusers names, each
module apart) become Deltas per diffusers module (a fused BFL qkv/linear1 split by rows). Every tensor must be finite
and floating-point, every Delta fusable, before the LoRA is cached or used; DoRA is refused.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import LoraError, short

log = logging.getLogger(__name__)

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
COMPONENTS = (TRANSFORMER, TEXT_ENCODER)

# Each kind's factors (LyCORIS' names; "lora" is a low-rank pair, from any layout).
FACTORS = {
    "lora": ("lora_up", "lora_down"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
KIND_NAMES = {"lokr": "LoKr", "loha": "LoHa", "lora": "LoRA"}


@dataclass(frozen=True, eq=False)
class Delta:
    """One module's weight change kept as its factors: ΔW is computed when it is fused.

      lora  lora_up @ lora_down (B @ A)
      lokr  kron(w1, w2), each factor full (lokr_w1) or a product (lokr_w1_a @ lokr_w1_b)
      loha  (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)

    times `scale` (alpha / rank, as the file's layout defines it); `rows` picks the rows of that product this module
    takes, in order (one of q, k, v of a fused BFL qkv, or the final modulation with its halves swapped). Several
    Deltas may share factors. `problem()` says why a Delta cannot be fused (None: it can).
    """

    kind: str
    factors: dict[str, torch.Tensor] = field(repr=False)
    scale: float
    source: str  # the module as the file names it, for messages
    rows: tuple[tuple[int, int], ...] | None = None

    @property
    def product_shape(self) -> tuple[int, int]:
        f = self.factors
        if self.kind == "lokr":
            (a, c), (b, d) = (_factor_shape(f, "lokr_w1"), _factor_shape(f, "lokr_w2"))
            return a * b, c * d
        if self.kind == "loha":
            return f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]
        return f["lora_up"].shape[0], f["lora_down"].shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        out, inner = self.product_shape
        return (sum(stop - start for start, stop in self.rows) if self.rows else out), inner

    @property
    def rank(self) -> int:
        f = self.factors
        for name in ("lokr_w1_a", "lokr_w2_a", "hada_w1_a", "lora_down"):
            if name in f:
                return f[name].shape[0] if name == "lora_down" else f[name].shape[1]
        return 1

    def problem(self) -> str | None:
        """Why these factors cannot be fused into any layer (None when they can): not matrices of numbers, shapes
        that do not multiply, a rank of 0, values or a scale that are not finite."""
        f = self.factors
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in f.items())
        if any(not v.is_floating_point() for v in f.values()):
            kinds = ", ".join(f"{k} {str(v.dtype).removeprefix('torch.')}" for k, v in f.items())
            return f"holds factors that are not floating-point numbers ({kinds})"
        if any(v.ndim != 2 for v in f.values()):
            return f"has factors that are not matrices ({shapes})"
        if self.kind == "lokr":
            for w in ("lokr_w1", "lokr_w2"):
                if w in f:
                    continue
                if f.get(w + "_a") is None or f.get(w + "_b") is None:
                    return f"lacks {w} (or {w}_a and {w}_b)"
                if f[w + "_a"].shape[1] != f[w + "_b"].shape[0]:
                    return f"has LoKr factors that do not multiply ({shapes})"
        elif self.kind == "loha":
            missing = [n for n in FACTORS["loha"] if n not in f]
            if missing:
                return f"lacks {', '.join(missing)}"
            a1, b1, a2, b2 = (f[n] for n in FACTORS["loha"])
            if a1.shape[1] != b1.shape[0] or a2.shape[1] != b2.shape[0] or a1.shape[0] != a2.shape[0] or b1.shape[1] != b2.shape[1]:
                return f"has LoHa factors that do not multiply out to one shape ({shapes})"
        else:
            if "lora_down" not in f or "lora_up" not in f:
                return "lacks lora_down or lora_up (lora_A or lora_B)"
            if f["lora_up"].shape[1] != f["lora_down"].shape[0]:
                return f"has a low-rank pair that does not multiply ({shapes})"
        if self.rank < 1 or 0 in self.product_shape:
            return f"has rank 0 ({shapes}): it changes nothing and cannot be scaled"
        if not all(bool(torch.isfinite(v).all()) for v in f.values()):
            return "holds numbers that are not finite (NaN or infinity)"
        if not math.isfinite(self.scale):
            return f"has a scale (alpha / rank) that is not finite ({self.scale})"
        if not math.isfinite(self.bound):
            return "has numbers so large that its weight change is not finite"
        return None

    @functools.cached_property
    def bound(self) -> float:
        """An upper bound on the largest entry of scale * ΔW (Cauchy-Schwarz on each product), without forming
        ΔW: float64, cheap, and loose only by the factors' shapes."""
        f = {k: v.double() for k, v in self.factors.items()}

        def product(a: str, b: str) -> float:
            return float(f[a].norm(dim=1).max() * f[b].norm(dim=0).max())

        def part(w: str) -> float:
            return float(f[w].abs().max()) if w in f else product(w + "_a", w + "_b")

        if self.kind == "lokr":
            value = part("lokr_w1") * part("lokr_w2")
        elif self.kind == "loha":
            value = product("hada_w1_a", "hada_w1_b") * product("hada_w2_a", "hada_w2_b")
        else:
            value = product("lora_up", "lora_down")
        return value * abs(self.scale)

    def weight(self, device=None) -> torch.Tensor:
        """scale * ΔW for this module, in float32 on `device`."""
        f = {k: v.to(device, torch.float32) for k, v in self.factors.items()}
        if self.kind == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            delta = torch.kron(w1, w2)
        elif self.kind == "loha":
            delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        else:
            delta = f["lora_up"] @ f["lora_down"]
        return self.pick(delta * self.scale if self.scale != 1 else delta)

    def pick(self, whole: torch.Tensor) -> torch.Tensor:
        """This module's rows of its factors' whole (scaled) product; the whole product where it takes it all."""
        return torch.cat([whole[start:stop] for start, stop in self.rows]) if self.rows else whole


def _factor_shape(factors: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in factors:
        return tuple(factors[name].shape)
    return factors[name + "_a"].shape[0], factors[name + "_b"].shape[1]


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One LoRA, as per-layer factors on the CPU: "<component>.<module>" -> its Delta."""

    key: str  # identifies the file's content (cache key); never holds a token
    shown: str  # how logs and messages name it; never holds a token
    layout: str  # the layout the file was written in (diffusers, kohya, xlabs, lokr, ...)
    deltas: dict[str, Delta] = field(repr=False)
    unapplied: int = 0  # tensors this loader does not apply (T5, bias/norm differences): named in the log

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.deltas))

    def deltas_of(self, component: str) -> dict[str, Delta]:
        """module name -> Delta for one component."""
        prefix = component + "."
        return {k[len(prefix):]: v for k, v in self.deltas.items() if k.startswith(prefix)}

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.deltas.values()), default=0)



# ----- layouts into diffusers' keys ------------------------------------------------------------------------------

_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")
# diffusers' kohya converter leaves the transformer's top-level modules without their "transformer." prefix, and
# diffusers then skips them without a word: they get it back here.
_TRANSFORMER_ROOTS = ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.",
                      "transformer_blocks.", "single_transformer_blocks.")


def layout(keys: list[str], metadata: dict | None) -> str:
    """The name of the layout a LoRA file is written in, for the logs and for the routing diffusers cannot do (the
    order follows diffusers' own detection). "unknown" refuses nothing: diffusers decides."""
    kinds = {kind for k in keys for kind, names in _LYCORIS.items() if kind != "lora" and _suffix(k) in names}
    if kinds:
        return kinds.pop() if len(kinds) == 1 else "lycoris"
    if any(k.startswith("base_model.model.") and _strip_bfl_prefix(k).startswith(_BFL_ROOTS) for k in keys):
        return "fal"
    if any(k.startswith("lora_transformer_") for k in keys):
        return "onetrainer"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".lora_down.weight" in k for k in keys) and any(k.startswith("diffusion_model.") for k in keys):
        return "bfl"
    if any("processor" in k for k in keys):
        return "xlabs"
    if any("query_norm.scale" in k for k in keys):
        return "bfl-control"
    if any(_strip_bfl_prefix(k).startswith(_BFL_ROOTS) for k in keys):
        return "bfl-peft" if any(".lora_A." in k for k in keys) else "bfl"
    if any(k.startswith(("transformer.", "text_encoder.")) for k in keys):
        return "diffusers" if metadata and "lora_adapter_metadata" in metadata else "ai-toolkit"
    return "unknown"


def _strip_bfl_prefix(key: str) -> str:
    for prefix in ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _bfl_to_comfy(state_dict: dict) -> dict:
    """BFL module names with PEFT's lora_A/lora_B (or no prefix) renamed to the ComfyUI form diffusers converts."""
    out = {}
    for key, value in state_dict.items():
        key = "diffusion_model." + _strip_bfl_prefix(key)
        out[key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = value
    return out


FORMATS = ("diffusers/PEFT, PEFT's own base_model.model. keys, ai-toolkit, kohya/sd-scripts, OneTrainer, XLabs, "
           "BFL-native (ComfyUI, BFL's and fal's trainers), LyCORIS LoKr and LoHa")


def _unreadable(shown: str, keys: list[str], why: str = "") -> LoraError:
    """What the file holds and what is accepted; `why` says what was recognised, if anything."""
    if why:
        return LoraError(f"{shown} {why} (its keys look like {', '.join(short(k) for k in keys[:4])}). This loader "
                         f"reads FLUX LoRAs in these layouts: {FORMATS}.")
    return LoraError(
        f"{shown} is not a FLUX LoRA in any layout this loader reads ({FORMATS}): its keys look like "
        f"{', '.join(short(k) for k in keys[:4])}. Use a LoRA trained for FLUX.1-dev, as a .safetensors file in one "
        "of these layouts."
    )


def normalize(path: Path, key: str, shown: str) -> LoraWeights:
    """A safetensors LoRA file as per-layer factors (flux.lora.Delta per "<component>.<module>"), each checked to be
    fusable (matrices of finite numbers that multiply out, rank at least 1, a finite scale); refused with a message
    that says what to change if it cannot be. Key names go through diffusers' own converters; the file's adapter
    metadata is read only for the numbers that scale the LoRA (as PEFT would scale it), never as a configuration."""
    tensors, header = _read(path, shown)
    tensors, unapplied = _without_unapplied(tensors, shown)
    if not tensors:
        raise LoraError(f"{shown} holds only weights this loader does not apply (T5 text-encoder weights, bias or norm "
                        "differences): it would change nothing. Use a LoRA with weights for FLUX's transformer.")
    tensors, wrapped = _without_peft_wrapper(tensors)
    keys = list(tensors)
    kind = layout(keys, header)
    if kind == "bfl-control":
        raise LoraError(f"{shown} is a FLUX Control LoRA (Canny/Depth): it needs a control image, which this model "
                        "does not take.")
    tensors = _numbers(tensors, shown)
    dora = next((k for k in keys if k.endswith((".dora_scale", "lora_magnitude_vector"))), None)
    if dora is not None:
        raise LoraError(f"{shown} is a DoRA ({short(dora)}): this loader applies LoRA, LoKr and LoHa weights, not "
                        "DoRA's weight decomposition. Use the LoRA without DoRA.")
    if kind in ("lokr", "loha", "lycoris", "onetrainer"):
        deltas = _per_module(tensors, shown, kind)
    else:
        deltas = _low_rank(tensors, header, kind, shown)
    checked = {(id(d.factors), d.scale): d for d in deltas.values()}  # rows play no part: once per shared factors
    for delta in checked.values():
        problem = delta.problem()
        if problem:
            raise LoraError(f"{shown} cannot be used: {short(delta.source)} {problem}. Use an intact LoRA file.")
    return LoraWeights(key=key, shown=shown, layout="peft" if wrapped and kind != "fal" else kind, deltas=deltas,
                       unapplied=unapplied)


# ----- schemes read before a layout is chosen (each: where its key names come from) ---------------------------------

# Text encoders FLUX LoRAs may carry and this loader does not change (diffusers' FLUX loader has no T5 LoRA either):
# the key prefix -> how the log names the encoder.
#   lora_te3_                    sd-scripts networks/lora_flux.py (LORA_PREFIX_TEXT_ENCODER_T5)
#   lora_te2_                    OneTrainer's FLUX LoRA (its second text encoder is T5; FLUX has one CLIP)
#   text_encoders.t5xxl.         ComfyUI's saved LoRAs (diffusers' lora_conversion_utils drops them too)
#   text_encoder_2.              diffusers' component name for T5
UNAPPLIED_ENCODERS = {"lora_te3_": "kohya lora_te3_", "lora_te2_": "OneTrainer lora_te2_",
                      "text_encoders.t5xxl.": "ComfyUI text_encoders.t5xxl.", "text_encoder_2.": "text_encoder_2."}


# Full-weight differences ComfyUI's LoRA extract writes beside the low-rank factors (comfy_extras/nodes_lora_extract.py:
# `.diff_b` for a layer's bias, `.diff` for a 1-D weight such as a norm's scale); diffusers' FLUX converters drop them
# at INFO level. This loader fuses low-rank changes only: the suffix -> how the log names them.
UNAPPLIED_DIFFERENCES = {".diff_b": "bias differences (.diff_b)", ".diff": "norm and other 1-D weight differences (.diff)"}


def _without_unapplied(tensors: dict, shown: str) -> tuple[dict, int]:
    """The tensors this loader applies, and how many it does not (text encoders it does not change, ComfyUI's bias and
    norm differences): those are named in the log, never dropped in silence, and counted for the prediction's
    metrics (`lora_unapplied_tensors`)."""
    kept, encoders, differences = {}, collections.Counter(), collections.Counter()
    for name, value in tensors.items():
        prefix = next((p for p in UNAPPLIED_ENCODERS if name.startswith(p)), None)
        suffix = next((x for x in UNAPPLIED_DIFFERENCES if name.endswith(x)), None)
        if prefix is not None:
            encoders[UNAPPLIED_ENCODERS[prefix]] += 1
        elif suffix is not None:
            differences[UNAPPLIED_DIFFERENCES[suffix]] += 1
        else:
            kept[name] = value
    for names, count in encoders.items():
        log.warning("lora: %s carries T5 text-encoder weights (%d tensors) in %s names; this loader changes FLUX's "
                    "transformer and CLIP only (as diffusers' FLUX loader does), so they are not applied",
                    shown, count, names)
    for what, count in differences.items():
        log.warning("lora: %s carries %s (%d tensors); this loader applies low-rank changes only (as diffusers' FLUX "
                    "converters do), so they are not applied", shown, what, count)
    return kept, sum(encoders.values()) + sum(differences.values())


# PEFT's own wrapper prefix: `PeftModel.save_pretrained` writes `base_model.model.<module>` (peft/utils/
# save_and_load.py keeps the wrapper's names), SimpleTuner's PEFT saves `transformer.base_model.model.<module>`.
# Under it, diffusers module names; BFL names under `base_model.model.` are fal's trainer (layout "fal").
_PEFT_WRAPPERS = ("transformer.base_model.model.", "base_model.model.")


def _without_peft_wrapper(tensors: dict) -> tuple[dict, bool]:
    """diffusers module names under PEFT's wrapper prefix as `transformer.<module>` keys; whether any were."""
    out, wrapped = {}, False
    for name, value in tensors.items():
        prefix = next((p for p in _PEFT_WRAPPERS if name.startswith(p)), None)
        if prefix is not None and name[len(prefix):].startswith(_TRANSFORMER_ROOTS):
            name, wrapped = "transformer." + name[len(prefix):], True
        out[name] = value
    return out, wrapped


def _read(path: Path, shown: str) -> tuple[dict, dict]:
    """The file's tensors (on the CPU) and its header's metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError):
        raise LoraError(f"{shown} is not a safetensors file this loader can read (its header or tensors are "
                        "damaged, or use a type torch has no place for): check the file.") from None


def _numbers(tensors: dict, shown: str) -> dict:
    """The tensors in float32, refused unless each is floating-point and finite; an alpha may be a one-element integer
    (as float32 then, which diffusers' converters take). Factors saved in fp8 (e4m3, e5m2: torch has no finite
    check or product for them), fp16 or bf16 are read in float32 before any check or product."""
    out = {}
    for name, value in tensors.items():
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.to(torch.float32)
        if name.endswith(".alpha"):
            if value.numel() != 1:
                raise LoraError(f"{shown}: {short(name)} holds {value.numel()} numbers; an alpha is one number.")
            if not value.is_floating_point():
                if value.dtype.is_complex or value.dtype == torch.bool:
                    raise LoraError(f"{shown}: {short(name)} is a {str(value.dtype).removeprefix('torch.')}, not a "
                                    "number an alpha can be.")
                value = value.to(torch.float32)
        elif value.numel() == 0:
            raise LoraError(f"{shown}: {short(name)} is empty (shape {tuple(value.shape)}): a LoRA of rank 0 changes "
                            "nothing. Use an intact LoRA file.")
        elif not value.is_floating_point():
            raise LoraError(f"{shown}: {short(name)} holds {str(value.dtype).removeprefix('torch.')} values, not "
                            "floating-point numbers: it is not LoRA weights. Use an intact LoRA file.")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise LoraError(f"{shown}: {short(name)} holds numbers that are not finite (NaN or infinity): the file is "
                            "damaged or was saved from a diverged training run. Use another LoRA file.")
        out[name] = value
    return out


def _low_rank(tensors: dict, header: dict, kind: str, shown: str) -> dict[str, Delta]:
    """A low-rank LoRA in any layout diffusers converts, as one "lora" Delta per module, scaled as PEFT would."""
    from diffusers import FluxPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    config = _adapter_metadata(header, shown)
    source = dict(tensors)  # diffusers' converters pop what they convert
    if kind in ("bfl", "bfl-peft", "fal") and not any(k.startswith("diffusion_model.") and ".lora_down." in k
                                                      for k in tensors):
        source = _bfl_to_comfy(source)
    try:
        state_dict, alphas = FluxPipeline.lora_state_dict(source, return_alphas=True)
        state_dict = {("transformer." + k if k.startswith(_TRANSFORMER_ROOTS) else k): v for k, v in state_dict.items()}
        alphas = {("transformer." + k if k.startswith(_TRANSFORMER_ROOTS) else k): v for k, v in (alphas or {}).items()}
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
        log.info("lora: %s: diffusers' converter for the %s layout failed (%s)", shown, kind, type(exc).__name__)
        what = f"a {kind} LoRA" if kind != "unknown" else "a LoRA"
        raise LoraError(
            f"{shown} looks like {what} but its keys do not fit FLUX.1 (e.g. {', '.join(short(k) for k in list(tensors)[:4])}): "
            f"it was made for a different model, or is damaged. This loader reads FLUX LoRAs in these layouts: "
            f"{FORMATS}."
        ) from None
    leftover = [k for k in state_dict if not k.startswith(tuple(c + "." for c in COMPONENTS))]
    if leftover or not any(parts.values()):
        raise _unreadable(shown, leftover or list(tensors))
    deltas = {}
    for component, part in parts.items():
        modules = _pairs(part, component, shown)
        for module, scale in _scales(component, modules, config, alphas, shown).items():
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


# PEFT's LoraConfig fields that scale a LoRA, read from a file's adapter metadata as numbers (the rest is not read).
_SCALE_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


def _adapter_metadata(header: dict, shown: str) -> dict | None:
    """diffusers' adapter metadata from the file's header (`lora_adapter_metadata`, JSON), checked to be an object."""
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraError(f"{shown}: its adapter metadata (lora_adapter_metadata in the safetensors header) is not "
                        "valid JSON. Save the LoRA again, or remove that metadata.") from None
    if not isinstance(config, dict):
        raise LoraError(f"{shown}: its adapter metadata (lora_adapter_metadata in the safetensors header) is not a "
                        "JSON object of settings. Save the LoRA again, or remove that metadata.")
    return config


def _scales(component: str, modules: dict, config: dict | None, alphas: dict, shown: str) -> dict[str, float]:
    """Each module's scale, as PEFT would give it: lora_alpha / r (alpha / sqrt(r) with use_rslora), r and alpha
    from the adapter metadata (its rank_pattern and alpha_pattern matched as PEFT does: the module's name or a
    suffix of it), else from the file's alpha tensors (diffusers' network alphas), else 1. The metadata's rank must
    be the weights' rank: PEFT would fail on any other."""
    from peft import LoraConfig

    fields = {k[len(component) + 1:]: v for k, v in (config or {}).items() if k.startswith(component + ".")}
    ranks = {m: a.shape[0] for m, (a, _) in modules.items()}
    if fields:
        defaults = LoraConfig.__dataclass_fields__
        unused = sorted(k for k in fields if k not in _SCALE_FIELDS)
        if unused:
            log.info("lora: %s: adapter metadata %s not used (this loader fuses the file's low-rank pairs only)",
                     shown, ", ".join(short(k, 40) for k in unused[:6]))
        if fields.get("use_dora"):
            raise LoraError(f"{shown}: its adapter metadata asks for DoRA (use_dora): this loader applies LoRA weights, "
                            "not DoRA's weight decomposition. Use the LoRA without DoRA.")
        r = _metadata_rank(fields.get("r", defaults["r"].default), "r", shown)
        alpha = _metadata_number(fields.get("lora_alpha", defaults["lora_alpha"].default), "lora_alpha", shown)
        rank_pattern = _pattern(fields.get("rank_pattern"), "rank_pattern", shown, _metadata_rank)
        alpha_pattern = _pattern(fields.get("alpha_pattern"), "alpha_pattern", shown, _metadata_number)
        rslora = fields.get("use_rslora") or False
        if not isinstance(rslora, bool):
            raise LoraError(f"{shown}: its adapter metadata gives use_rslora={short(repr(rslora), 40)}, not true or false.")
        scales = {}
        for module, rank in ranks.items():
            own_r = _matching(rank_pattern, module, r)
            if own_r != rank:
                raise LoraError(f"{shown}: its adapter metadata gives rank {own_r} for {component}.{short(module)}, but "
                                f"its weights have rank {rank}: the metadata does not belong to these weights. Save "
                                "the LoRA again, or remove the metadata.")
            own_alpha = _matching(alpha_pattern, module, alpha)
            scales[module] = own_alpha / (math.sqrt(rank) if rslora else rank)
        return scales
    own = {k.removesuffix(".alpha").split(".lora_A.")[0][len(component) + 1:]: float(v)
           for k, v in alphas.items() if k.startswith(component + ".")}
    if not own:
        return dict.fromkeys(modules, 1.0)
    common = collections.Counter(own.values()).most_common(1)[0][0]  # diffusers' lora_alpha for modules without one
    return {m: own.get(m, common) / rank if rank else math.nan for m, rank in ranks.items()}  # rank 0: refused later


def _metadata_number(value, name: str, shown: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraError(f"{shown}: its adapter metadata gives {name}={short(repr(value), 40)}, not a finite number. "
                        "Save the LoRA again, or remove the metadata.")
    return float(value)


def _metadata_rank(value, name: str, shown: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraError(f"{shown}: its adapter metadata gives rank {name}={short(repr(value), 40)}; a rank is a whole "
                        "number of at least 1. Save the LoRA again, or remove the metadata.")
    return value


_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")


def _pattern(value, name: str, shown: str, check) -> dict:
    """A rank_pattern / alpha_pattern: module names (PEFT reads them as regular expressions; here only names are
    taken, never an expression from a file) to numbers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LoraError(f"{shown}: its adapter metadata gives {name} as {type(value).__name__}, not an object of module "
                        "names. Save the LoRA again, or remove the metadata.")
    for key in value:
        if not _MODULE_NAME.fullmatch(key):
            raise LoraError(f"{shown}: its adapter metadata has {name} key {short(repr(key), 60)}, which is not a module "
                            "name (a regular expression is not read from a file). Save the LoRA again with module names.")
    return {key: check(v, f"{name}[{short(key, 40)}]", shown) for key, v in value.items()}


def _matching(pattern: dict, module: str, default):
    """PEFT's pattern rule: the first key equal to the module's name or to a dotted suffix of it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


# ----- LyCORIS: LoKr and LoHa ----------------------------------------------------------------------------------------

# The tensors of one module per kind (LyCORIS' names); "lora" is a plain LoRA pair, which LyCORIS files mix in.
_LYCORIS = {"lokr": FACTORS["lokr"], "loha": FACTORS["loha"], "lora": ("lora_down.weight", "lora_up.weight")}
# Parts of LyCORIS that FLUX's Linear layers have no use for or that this loader does not apply.
_LYCORIS_UNSUPPORTED = {"lokr_t1": "a Tucker core (conv layers)", "lokr_t2": "a Tucker core (conv layers)",
                        "hada_t1": "a Tucker core (conv layers)", "hada_t2": "a Tucker core (conv layers)",
                        "dora_scale": "DoRA weight decomposition"}
_LYCORIS_SUFFIXES = sorted({s for names in _LYCORIS.values() for s in names} | set(_LYCORIS_UNSUPPORTED) | {"alpha"},
                           key=len, reverse=True)


def _suffix(key: str) -> str | None:
    return next((s for s in _LYCORIS_SUFFIXES if key.endswith("." + s)), None)


# BFL module -> the diffusers modules it stands for and the share of the rows each takes (None: the whole).
_BFL_DOUBLE = {
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "img_attn.proj": (("attn.to_out.0",), None),
    "img_mlp.0": (("ff.net.0.proj",), None),
    "img_mlp.2": (("ff.net.2",), None),
    "img_mod.lin": (("norm1.linear",), None),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
    "txt_attn.proj": (("attn.to_add_out",), None),
    "txt_mlp.0": (("ff_context.net.0.proj",), None),
    "txt_mlp.2": (("ff_context.net.2",), None),
    "txt_mod.lin": (("norm1_context.linear",), None),
}
_BFL_SINGLE = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4)),  # FLUX's MLP is 4x the width
    "linear2": (("proj_out",), None),
    "modulation.lin": (("norm.linear",), None),
}
_BFL_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # BFL's halves are (scale, shift), diffusers' (shift, scale)
}
_DIFFUSERS_BLOCK = {m for table in (_BFL_DOUBLE, _BFL_SINGLE) for ms, _ in table.values() for m in ms}
_DIFFUSERS_GLOBAL = set(_BFL_GLOBAL.values())
_CLIP = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _lycoris_targets(module: str) -> list[tuple[str, tuple[int, ...] | None, bool]] | None:
    """A LyCORIS module name (kohya's BFL names, LyCORIS' diffusers names, dotted or not) -> the diffusers modules it
    stands for ("<component>.<module>"), each with the row shares of a fused module and whether it is the final
    modulation (halves swapped); None if it names nothing FLUX.1 has."""
    for prefix in ("lora_te1_", "lora_te_", "lycoris_te1_", "lycoris_te_", "text_encoder.", "text_encoders.clip_l.transformer."):
        if module.startswith(prefix):
            m = _CLIP.fullmatch(_flat(module[len(prefix):]))
            if m is None:
                return None
            part = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return [(f"text_encoder.text_model.encoder.layers.{m.group(1)}.{part}", None, False)]
    for prefix in ("lora_unet_", "lycoris_", "lora_transformer_", "model.diffusion_model.", "diffusion_model.",
                   "base_model.model.", "transformer."):
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    flat = _flat(module)
    if m := re.fullmatch(r"(double|single)_blocks_(\d+)_(.+)", flat):
        table = _BFL_DOUBLE if m.group(1) == "double" else _BFL_SINGLE
        block = "transformer_blocks" if m.group(1) == "double" else "single_transformer_blocks"
        found = next((v for b, v in table.items() if _flat(b) == m.group(3)), None)
        if found is None:
            return None
        names, shares = found
        return [(f"transformer.{block}.{m.group(2)}.{n}", shares, False) for n in names]
    if m := re.fullmatch(r"(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)", flat):
        name = next((d for d in _DIFFUSERS_BLOCK if _flat(d) == m.group(3)), None)
        return [(f"transformer.{m.group(1)}.{m.group(2)}.{name}", None, False)] if name else None
    if bfl := next((b for b in _BFL_GLOBAL if _flat(b) == flat), None):
        return [(f"transformer.{_BFL_GLOBAL[bfl]}", None, bfl == "final_layer.adaLN_modulation.1")]
    name = next((d for d in _DIFFUSERS_GLOBAL if _flat(d) == flat), None)
    return [(f"transformer.{name}", None, False)] if name else None


def _per_module(tensors: dict, shown: str, kind: str) -> dict[str, Delta]:
    """A file whose modules each carry their own factors and alpha as one Delta per diffusers module, checked to be
    complete and consistent: LyCORIS (LoKr, LoHa, with LoRA pairs mixed in) and OneTrainer's LoRAs
    (`lora_transformer_<diffusers module>` on every Linear, CLIP as `lora_te1_`: OneTrainer names each LoRA module
    after its path in the diffusers model, `.` as `_`, as its FLUX LoRA saver writes them). Each module's change is
    scale * its factors' product with scale alpha / rank, as LyCORIS and OneTrainer apply it (diffusers' converter for
    these names appends a submodule only for attention, so every other module would collapse onto its block)."""
    grouped: dict[str, dict[str, object]] = {}
    for name, value in tensors.items():
        suffix = _suffix(name)
        if suffix is None:
            raise _unreadable(shown, [name], f"looks like a LyCORIS file but {short(name)!r} is no LoKr, LoHa or LoRA "
                              "tensor")
        grouped.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
    deltas = {}
    for module, parts in grouped.items():
        unsupported = [_LYCORIS_UNSUPPORTED[s] for s in parts if s in _LYCORIS_UNSUPPORTED]
        if unsupported:
            raise LoraError(f"{shown}: {short(module)} uses {unsupported[0]}, which this loader does not apply to "
                            "FLUX's linear layers.")
        what = next((k for k, names in _LYCORIS.items() if any(s in parts for s in names)), None)
        if what is None:
            continue  # an alpha alone
        targets = _lycoris_targets(module)
        if targets is None:
            raise _unreadable(shown, [module], f"is a {kind} file for another model: {short(module)!r} names no layer "
                              "FLUX.1 has")
        factors = {s.removesuffix(".weight"): v for s, v in parts.items() if s in _LYCORIS[what]}
        unit = Delta(what, factors, 1.0, module)
        problem = unit.problem()
        if problem:
            raise LoraError(f"{shown} is not a valid {kind} file: {short(module)} {problem}.")
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
        raise _unreadable(shown, list(tensors), "looks like a LyCORIS file but holds no module to apply")
    return deltas
