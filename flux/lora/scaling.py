"""A low-rank pair's scale, as PEFT would give it, from a file's adapter metadata (read as numbers, each checked:
nothing in a file configures the serving model) or its alpha tensors."""

from __future__ import annotations

import collections
import json
import logging
import math
import re

from . import LoraError, short

log = logging.getLogger(__name__)

# PEFT's LoraConfig fields that scale a LoRA, read from a file's adapter metadata as numbers (the rest is not read).
_SCALE_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


def adapter_metadata(header: dict, shown: str) -> dict | None:
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


def scales(component: str, modules: dict, config: dict | None, alphas: dict, shown: str) -> dict[str, float]:
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
