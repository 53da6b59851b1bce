"""Fused q, k, v projections (FLUX_FUSED_PROJECTIONS): one matmul for q, k and v (and the added q, k, v) per
attention, the separate layers kept as views into the fused weights, so a LoRA fused into them lands in the fused
matmul too, exactly (flux/lora). Also what every module that moves or copies a fused transformer needs."""

from __future__ import annotations

import torch

FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _fused_attentions(transformer):
    return [m for m in transformer.modules() if getattr(m, "fused_projections", False)]


def fuse_projections(transformer, on: bool = True) -> None:
    """diffusers' fuse_qkv_projections (one matmul for q, k and v), keeping the separate layers as views into the
    fused weights: no second copy in memory, and a LoRA fused into to_q (flux/lora) is in to_qkv at once."""
    if not on:
        return
    transformer.fuse_qkv_projections()
    tie_projections(transformer)


def tie_projections(transformer) -> None:
    """Point each separate q, k, v layer's weight and bias at its rows of the fused layer, in place (the parameters
    stay the same objects). Needed again after .to() moves the transformer: it moves each parameter on its own."""
    with torch.no_grad():
        for attn in _fused_attentions(transformer):
            for fused_name, part_names in FUSED.items():
                fused = getattr(attn, fused_name, None)
                if fused is None:
                    continue
                row = 0
                for part in (getattr(attn, n, None) for n in part_names):
                    if part is None:
                        continue
                    rows = slice(row, row + part.out_features)
                    part.weight.data = fused.weight.data[rows]
                    if part.bias is not None:
                        part.bias.data = fused.bias.data[rows]
                    row += part.out_features


def move(transformer, device: torch.device) -> None:
    """transformer.to(device), keeping the fused projections' views (their separate layers are emptied first, so
    the move carries no second copy of q, k and v, and tied again after)."""
    attentions = _fused_attentions(transformer)
    with torch.no_grad():
        for attn in attentions:
            for part in (getattr(attn, n, None) for names in FUSED.values() for n in names):
                if part is not None:
                    part.weight.data = part.weight.data.new_empty(0)
                    if part.bias is not None:
                        part.bias.data = part.bias.data.new_empty(0)
    try:
        transformer.to(device)
    finally:
        tie_projections(transformer)


def drop_unfused(transformer) -> None:
    """Remove the separate q, k, v layers where fused ones compute (the fp8 copy: only the fused ones are
    quantized, and Fp8Sync maps a bf16 layer to its fused twin)."""
    for attn in _fused_attentions(transformer):
        for fused_name, part_names in FUSED.items():
            if hasattr(attn, fused_name):
                for name in part_names:
                    if hasattr(attn, name):
                        delattr(attn, name)


def fused_name(name: str) -> str | None:
    """transformer_blocks.0.attn.to_q -> transformer_blocks.0.attn.to_qkv (None for a layer that is not q, k, v)."""
    parent, _, leaf = name.rpartition(".")
    for fused, parts in FUSED.items():
        if leaf in parts:
            return f"{parent}.{fused}"
    return None
