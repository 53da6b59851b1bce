"""Key names of FLUX LoRA layouts that diffusers' converters do not cover, mapped to diffusers' modules: BFL's module
names (fused qkv / linear1, the final modulation's swapped halves) and LyCORIS' per-module factor names."""

from __future__ import annotations

import re

from ..bfl import GLOBAL as BFL_GLOBAL, SWAPPED
from .delta import FACTORS

BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")
# diffusers' kohya converter leaves the transformer's top-level modules without their "transformer." prefix, and
# diffusers then skips them without a word: they get it back here.
TRANSFORMER_ROOTS = ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.",
                      "transformer_blocks.", "single_transformer_blocks.")


def strip_bfl_prefix(key: str) -> str:
    for prefix in ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def bfl_to_comfy(state_dict: dict) -> dict:
    """BFL module names with PEFT's lora_A/lora_B (or no prefix) renamed to the ComfyUI form diffusers converts."""
    out = {}
    for key, value in state_dict.items():
        key = "diffusion_model." + strip_bfl_prefix(key)
        out[key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = value
    return out


# ----- LyCORIS: LoKr and LoHa ----------------------------------------------------------------------------------------

# The tensors of one module per kind (LyCORIS' names); "lora" is a plain LoRA pair, which LyCORIS files mix in.
LYCORIS = {"lokr": FACTORS["lokr"], "loha": FACTORS["loha"], "lora": ("lora_down.weight", "lora_up.weight")}
# Parts of LyCORIS that FLUX's Linear layers have no use for or that this loader does not apply.
LYCORIS_UNSUPPORTED = {"lokr_t1": "a Tucker core (conv layers)", "lokr_t2": "a Tucker core (conv layers)",
                        "hada_t1": "a Tucker core (conv layers)", "hada_t2": "a Tucker core (conv layers)",
                        "dora_scale": "DoRA weight decomposition"}
_LYCORIS_SUFFIXES = sorted({s for names in LYCORIS.values() for s in names} | set(LYCORIS_UNSUPPORTED) | {"alpha"},
                           key=len, reverse=True)


def lycoris_suffix(key: str) -> str | None:
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
_BFL_GLOBAL = BFL_GLOBAL  # the embedders and the final layer (flux/bfl.py); SWAPPED's halves are swapped
_DIFFUSERS_BLOCK = {m for table in (_BFL_DOUBLE, _BFL_SINGLE) for ms, _ in table.values() for m in ms}
_DIFFUSERS_GLOBAL = set(_BFL_GLOBAL.values())
_CLIP = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def lycoris_targets(module: str) -> list[tuple[str, tuple[int, ...] | None, bool]] | None:
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
        return [(f"transformer.{_BFL_GLOBAL[bfl]}", None, bfl == SWAPPED)]
    name = next((d for d in _DIFFUSERS_GLOBAL if _flat(d) == flat), None)
    return [(f"transformer.{name}", None, False)] if name else None
