"""A LoRA file read as per-layer factors: every layout, one form (`LoraWeights`: a `Delta` per module, delta.py).

`normalize` reads a .safetensors file. Its factors are read in float32 (fp8, fp16 and bf16 ones too) before any check
or product; T5 factors (kohya's lora_te3_, OneTrainer's lora_te2_, ComfyUI's t5xxl) are set aside, named in the log
and counted (`LoraWeights.unapplied`); PEFT's wrapper prefix (`base_model.model.`, SimpleTuner's
`transformer.base_model.model.`) is removed. Then the file's layout (flux/lora/layouts.py: a class each, detecting
and reading its keys) reads it: diffusers' FluxLoraLoaderMixin converters turn the key names of the layouts in use
(diffusers/PEFT, ai-toolkit, kohya/sd-scripts, XLabs, BFL-native as ComfyUI writes it) into diffusers/PEFT keys, and
each lora_A/lora_B pair becomes a Delta, scaled as PEFT would (scaling.py). The adapter metadata is read for the
scaling numbers only, each checked: nothing in a file configures the serving model. What diffusers cannot do for
FLUX.1 is routed by the layouts (key maps: keymaps.py): BFL names with PEFT's lora_A/lora_B (BFL's own trainer, and
fal's under `base_model.model.`) go to the ComfyUI form diffusers converts at any size; LyCORIS LoKr/LoHa files and
OneTrainer's LoRAs (diffusers names, each module apart) become Deltas per diffusers module (a fused BFL qkv/linear1
split by rows). Every tensor must be finite and floating-point, every Delta fusable, before the LoRA is cached or
used; DoRA is refused.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch

from . import LoraError, short
# TEXT_ENCODER, TRANSFORMER: flux/engine/ imports the component names from here
from .delta import TEXT_ENCODER, TRANSFORMER, LoraWeights  # noqa: F401
from .keymaps import TRANSFORMER_ROOTS
from .layouts import Fal, detect

log = logging.getLogger(__name__)


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
    kind = detect(keys, header)
    if kind.refused:
        raise LoraError(f"{shown} {kind.refused}")
    tensors = _numbers(tensors, shown)
    dora = next((k for k in keys if k.endswith((".dora_scale", "lora_magnitude_vector"))), None)
    if dora is not None:
        raise LoraError(f"{shown} is a DoRA ({short(dora)}): this loader applies LoRA, LoKr and LoHa weights, not "
                        "DoRA's weight decomposition. Use the LoRA without DoRA.")
    deltas = kind.read(tensors, header, shown)
    checked = {(id(d.factors), d.scale): d for d in deltas.values()}  # rows play no part: once per shared factors
    for delta in checked.values():
        problem = delta.problem()
        if problem:
            raise LoraError(f"{shown} cannot be used: {short(delta.source)} {problem}. Use an intact LoRA file.")
    return LoraWeights(key=key, shown=shown, layout="peft" if wrapped and kind is not Fal else kind.name, deltas=deltas,
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
        if prefix is not None and name[len(prefix):].startswith(TRANSFORMER_ROOTS):
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
