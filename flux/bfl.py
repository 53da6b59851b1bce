"""Black Forest Labs' key layout of a FLUX.1 transformer (the single-file checkpoints BFL and Replicate publish:
`double_blocks.0.img_attn.qkv.weight`, ...) and diffusers' (FluxTransformer2DModel), both ways, at any width.

diffusers' own converter (`convert_flux_transformer_checkpoint_to_diffusers`, which `from_single_file` runs) splits
a single block's fused projection at FLUX.1's width written in (3072), so it cannot read a FLUX of another width (the
tiny twins): this one splits every fused projection by its shares of the rows, and tests/test_singlefile.py checks
that it gives exactly what diffusers' converter gives at FLUX.1's width. `from_diffusers` is its inverse (the tiny
twins written as single files, flux/fakes/tiny.py).
"""

from __future__ import annotations

import re

# BFL module -> diffusers' modules it stands for (a fused projection: several, in row order) and each one's share of
# the rows (None: equal). A BFL norm ("..._norm") keeps its weight as `scale`.
DOUBLE = {
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": ("attn.norm_q",), "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",), "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
}
SINGLE = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": ("attn.norm_q",), "norm.key_norm": ("attn.norm_k",),
    "linear2": ("proj_out",),
}
SHARES = {"linear1": (1, 1, 1, 4)}  # FLUX's MLP is 4x the width
GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED = "final_layer.adaLN_modulation.1"  # BFL's halves are (shift, scale), diffusers' (scale, shift)
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's and others' wrappers of the same keys
REQUIRED = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")
_BLOCKS = {"double": ("transformer_blocks", DOUBLE), "single": ("single_transformer_blocks", SINGLE)}


def strip(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def targets(key: str) -> tuple[tuple[str, ...], tuple[int, ...] | None] | None:
    """A BFL parameter's diffusers parameters, in row order, and their shares; None for a key FLUX.1 lacks."""
    stem, _, param = strip(key).rpartition(".")
    if param not in ("weight", "bias", "scale") or (param == "scale") != stem.endswith("_norm"):
        return None
    param = "weight" if param == "scale" else param
    if m := _BLOCK.fullmatch(stem):
        block, table = _BLOCKS[m.group(1)]
        modules = table.get(m.group(3))
        if modules is None:
            return None
        return tuple(f"{block}.{m.group(2)}.{t}.{param}" for t in modules), SHARES.get(m.group(3))
    return ((f"{GLOBAL[stem]}.{param}",), None) if stem in GLOBAL else None


def unknown(keys) -> list[str]:
    """The keys of a checkpoint that are not FLUX.1 transformer parameters in BFL's layout."""
    return [k for k in keys if targets(k) is None]


def to_diffusers(state: dict) -> dict:
    """A BFL state dict (emptied as it is read) in diffusers' names; every key must be known (`unknown`)."""
    import torch

    out = {}
    for key in list(state):
        tensor = state.pop(key)
        names, shares = targets(key)
        if strip(key).startswith(SWAPPED):
            tensor = torch.cat(tensor.chunk(2)[::-1])
        if len(names) == 1:
            out[names[0]] = tensor
            continue
        shares = shares or (1,) * len(names)
        unit, rest = divmod(tensor.shape[0], sum(shares))
        if rest:
            raise ValueError(f"{key}: {tensor.shape[0]} rows do not split in shares {shares}")
        for name, piece in zip(names, tensor.split([unit * s for s in shares])):
            out[name] = piece.clone()  # its own storage, as diffusers' converter gives
    return out


def from_diffusers(state: dict) -> dict:
    """A FluxTransformer2DModel's state dict in BFL's names (the inverse of `to_diffusers`)."""
    import torch

    blocks = {kind: sorted({int(k.split(".")[1]) for k in state if k.startswith(block + ".")})
              for kind, (block, _) in _BLOCKS.items()}
    stems = [*GLOBAL, *(f"{kind}_blocks.{i}.{m}" for kind, (_, table) in _BLOCKS.items() for i in blocks[kind]
                        for m in table)]
    out = {}
    for stem in stems:
        for param in ("scale",) if stem.endswith("_norm") else ("weight", "bias"):
            names, _ = targets(f"{stem}.{param}")
            if all(n in state for n in names):
                tensor = torch.cat([state[n] for n in names])
                out[f"{stem}.{param}"] = torch.cat(tensor.chunk(2)[::-1]) if stem == SWAPPED else tensor
    used = {n for k in out for n in targets(k)[0]}
    if used != set(state):
        raise ValueError(f"not FLUX.1 parameters: {sorted(set(state) - used)[:5]}")
    return out
