"""Random LoRAs for the tiny and the full-size FLUX, for tests and benchmarks: a low-rank update over a named
subset of a transformer's modules, written as diffusers writes a LoRA (tests/helpers/loras.py writes the same update in
every other layout in use).

An `Update` is a set of low-rank weight changes: for each target module (diffusers name), A (rank x in) and
B (out x rank), so that the module's weight becomes W + scale * B @ A. Updates are built over a named subset:
  ATTENTION  the attention projections of the double blocks: every layout expresses these
  XLABS      ATTENTION plus the single blocks' q/k/v and output projection: what XLabs files hold (diffusers,
             ai-toolkit and XLabs layouts; the fused layouts hold single-block q/k/v only with the MLP, in linear1)
  FUSED_OK   every Linear except the single blocks' q/k/v/proj_mlp: diffusers' kohya converter splits the fused
             `linear1` with FLUX.1's sizes (3072, 12288) written in, which the tiny FLUX (32, 128) cannot match;
             everything else converts at any size
  ALL        every Linear of the transformer (diffusers and ai-toolkit layouts)
  BLOCKS     every attention and MLP Linear of every block: what a trainer's LoRA usually holds (script/benchmark gpu)
  FUSED      the fused BFL modules only (each double block's img/txt qkv, each single block's linear1): the ones
             diffusers splits at FLUX.1's widths (tests/test_lora_width.py, on a transformer of that width)
Modules that a fused layout stores as one (q, k, v) share one A, so the fused file holds the update exactly.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

RANK = 4

# BFL module -> diffusers module(s) of the tiny FLUX, per double block / single block / the whole model.
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
GLOBAL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
                "proj_lora2": "txt_attn.proj"}
ATTENTION_BFL = tuple(XLABS_DOUBLE.values())
# XLabs' single-block processor adds q/k/v (no MLP part) and the output projection: no BFL module is just that,
# so these groups are named after XLabs' own keys.
XLABS_SINGLE = {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",)}
TEXT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def bfl_groups(transformer) -> dict[str, tuple[str, ...]]:
    """Every BFL module of this transformer -> the diffusers modules it stands for (full names)."""
    groups = {}
    for i in range(len(transformer.transformer_blocks)):
        groups |= {f"double_blocks.{i}.{b}": tuple(f"transformer_blocks.{i}.{d}" for d in ds) for b, ds in DOUBLE.items()}
    for i in range(len(transformer.single_transformer_blocks)):
        groups |= {f"single_blocks.{i}.{b}": tuple(f"single_transformer_blocks.{i}.{d}" for d in ds)
                   for b, ds in SINGLE.items()}
    return groups | GLOBAL


def subset(transformer, name: str) -> dict[str, tuple[str, ...]]:
    """The groups of a named module subset: ATTENTION, XLABS, FUSED_OK, ALL, BLOCKS or FUSED."""
    groups = bfl_groups(transformer)
    attention = {b: ds for b, ds in groups.items() if b.startswith("double_blocks.") and b.split(".", 2)[2] in ATTENTION_BFL}
    if name == "ATTENTION":
        return attention
    if name == "XLABS":  # all that XLabs files hold: the double blocks' attention, the single blocks' qkv and output
        return attention | {
            f"single_blocks.{i}.{x}": tuple(f"single_transformer_blocks.{i}.{d}" for d in ds)
            for i in range(len(transformer.single_transformer_blocks)) for x, ds in XLABS_SINGLE.items()
        }
    if name == "FUSED_OK":
        return {b: ds for b, ds in groups.items() if not b.endswith(".linear1")}
    if name == "ALL":
        return groups
    if name == "FUSED":
        return {b: ds for b, ds in groups.items() if b.endswith((".qkv", ".linear1"))}
    if name == "BLOCKS":  # every attention and MLP linear of every block (no modulation, no embedders)
        return {b: ds for b, ds in groups.items()
                if b.startswith(("double_blocks.", "single_blocks.")) and not b.endswith(".lin")}
    raise ValueError(name)


@dataclass
class Update:
    """module -> (A, B): the weight change of each module is B @ A (times the LoRA scale)."""

    transformer: dict[str, tuple[torch.Tensor, torch.Tensor]]
    text_encoder: dict[str, tuple[torch.Tensor, torch.Tensor]]
    groups: dict[str, tuple[str, ...]]  # BFL name -> diffusers modules, for the fused layouts
    rank: int = RANK


def linear_of(module, name):
    layer = module.get_submodule(name)
    assert isinstance(layer, torch.nn.Linear), name
    return layer


def make_update(transformer, modules: str = "ATTENTION", text_encoder=None, seed: int = 0, strength: float = 1.0,
                rank: int = RANK) -> Update:
    """A random low-rank update over a module subset of `transformer` (and every CLIP layer if text_encoder is given).

    strength ~ the size of B @ A relative to a freshly initialised weight; 1 changes the tiny FLUX's image clearly.
    """
    gen = torch.Generator().manual_seed(seed)
    groups = subset(transformer, modules)
    tr = {}
    for bfl, members in groups.items():
        first = linear_of(transformer, members[0])
        a = torch.randn(rank, first.in_features, generator=gen) / first.in_features**0.5
        for name in members:
            layer = linear_of(transformer, name)
            tr[name] = (a, torch.randn(layer.out_features, rank, generator=gen) * strength / rank**0.5)
    te = {}
    if text_encoder is not None:
        for i in range(len(text_encoder.text_model.encoder.layers) if hasattr(text_encoder, "text_model")
                       else len(text_encoder.encoder.layers)):
            for m in TEXT_MODULES:
                layer = linear_of(text_encoder, f"encoder.layers.{i}.{m}")
                te[f"text_model.encoder.layers.{i}.{m}"] = (
                    torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5,
                    torch.randn(layer.out_features, rank, generator=gen) * strength / rank**0.5,
                )
    return Update(tr, te, groups, rank)


def as_stored(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype).contiguous().clone()


def diffusers_layout(update: Update, alpha: float | None = None, dtype=torch.float32) -> tuple[dict, dict | None]:
    """diffusers' own writer, with lora_alpha = alpha (default rank / 2) in the adapter metadata."""
    from diffusers import FluxPipeline

    alpha = alpha or update.rank / 2
    scale = alpha / update.rank  # the loader multiplies B @ A by alpha / rank: store B / scale
    tr = {f"{m}.lora_A.weight": as_stored(a, dtype) for m, (a, _) in update.transformer.items()}
    tr |= {f"{m}.lora_B.weight": as_stored(b / scale, dtype) for m, (_, b) in update.transformer.items()}
    te = {f"{m}.lora_A.weight": as_stored(a, dtype) for m, (a, _) in update.text_encoder.items()}
    te |= {f"{m}.lora_B.weight": as_stored(b / scale, dtype) for m, (_, b) in update.text_encoder.items()}

    def config(modules):  # CLIP targets by short names, as diffusers' training scripts write them
        return {"r": update.rank, "lora_alpha": alpha, "target_modules": sorted(modules)}

    with tempfile.TemporaryDirectory() as tmp:  # written by diffusers itself, read back as it wrote it
        FluxPipeline.save_lora_weights(
            tmp, transformer_lora_layers=tr or None, text_encoder_lora_layers=te or None,
            transformer_lora_adapter_metadata=config(update.transformer) if tr else None,
            text_encoder_lora_adapter_metadata=config({m.rsplit(".", 1)[1] for m in update.text_encoder}) if te else None,
        )
        with safe_open(Path(tmp) / "pytorch_lora_weights.safetensors", "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def diffusers_bytes(update: Update, alpha: float | None = None, dtype=torch.float32) -> bytes:
    """The update as a diffusers LoRA file (.safetensors)."""
    return save(*diffusers_layout(update, alpha, dtype))
