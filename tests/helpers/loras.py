"""Tiny LoRAs for the tiny FLUX, written in every layout in use, from one low-rank update.

An `Update` is a set of low-rank weight changes: for each target module (diffusers
name), A (rank x in) and B (out x rank), so that the module's weight becomes
W + scale * B @ A. The writers below store the same update in each file layout:

  diffusers   `FluxPipeline.save_lora_weights` (PEFT keys `transformer.<module>.lora_A.weight`, the adapter config
              with lora_alpha in the safetensors header)
  ai-toolkit  PEFT keys with the `transformer.` prefix, no alphas (what ai-toolkit and Replicate's trainer write)
  kohya       sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`;
              fused qkv and linear1; CLIP as `lora_te1_...`
  xlabs       XLabs: `double_blocks.0.processor.qkv_lora1.down.weight`, `single_blocks.0.processor.qkv_lora.up.weight`
  bfl         BFL-native module names (fused qkv / linear1) as ComfyUI saves them: `diffusion_model.double_blocks.0.
              img_attn.qkv.lora_down.weight` + `.alpha`, CLIP as `text_encoders.clip_l.transformer...`
  bfl-peft    BFL-native names with PEFT's lora_A / lora_B and no prefix (BFL's own trainer)
  fal         BFL-native names with PEFT's lora_A / lora_B under `base_model.model.` (fal's trainer)
  peft        diffusers names with PEFT's lora_A / lora_B under PEFT's wrapper prefix (`base_model.model.` from
              PeftModel.save_pretrained, `transformer.base_model.model.` from SimpleTuner)
  onetrainer  OneTrainer: `lora_transformer_<diffusers module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
              on each module apart, CLIP as `lora_te1_...`
  t5_tensors  T5 factors as a trainer adds them (kohya `lora_te3_`, OneTrainer `lora_te2_`, ComfyUI
              `text_encoders.t5xxl.transformer.`), to be named in the log and not applied

LyCORIS files (LoKr, LoHa) are not low-rank updates: `lycoris_file` writes random ones directly, in kohya's BFL
names or LyCORIS' diffusers names, and says which diffusers modules each file module stands for; the tests compute
their ΔW themselves.

Each layout can express a different set of modules, so updates are built over a named subset:
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
Alphas are powers of two times the rank, so alpha scaling is exact in floating point and every layout of an update
converts to bit-identical tensors.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from tests.helpers.images import data_uri

RANK = 4
# Which layouts can express an update over each module subset (see above).
EXPRESSIBLE = {
    "ATTENTION": ["diffusers", "ai-toolkit", "kohya", "xlabs", "bfl", "bfl-peft", "fal"],
    "XLABS": ["diffusers", "ai-toolkit", "xlabs"],
    "FUSED_OK": ["diffusers", "ai-toolkit", "kohya", "bfl", "bfl-peft", "fal"],
    "ALL": ["diffusers", "ai-toolkit"],
    "BLOCKS": ["diffusers", "ai-toolkit"],
}

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


def _linear(module, name):
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
        first = _linear(transformer, members[0])
        a = torch.randn(rank, first.in_features, generator=gen) / first.in_features**0.5
        for name in members:
            layer = _linear(transformer, name)
            tr[name] = (a, torch.randn(layer.out_features, rank, generator=gen) * strength / rank**0.5)
    te = {}
    if text_encoder is not None:
        for i in range(len(text_encoder.text_model.encoder.layers) if hasattr(text_encoder, "text_model")
                       else len(text_encoder.encoder.layers)):
            for m in TEXT_MODULES:
                layer = _linear(text_encoder, f"encoder.layers.{i}.{m}")
                te[f"text_model.encoder.layers.{i}.{m}"] = (
                    torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5,
                    torch.randn(layer.out_features, rank, generator=gen) * strength / rank**0.5,
                )
    return Update(tr, te, groups, rank)


def _t(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype).contiguous().clone()


def _swap_scale_shift(b: torch.Tensor) -> torch.Tensor:
    shift, scale = b.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _fused(update: Update, bfl: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    members = [m for m in update.groups.get(bfl, ()) if m in update.transformer]
    if not members:
        return None
    a = update.transformer[members[0]][0]
    b = torch.cat([update.transformer[m][1] for m in members], dim=0)
    if bfl == "final_layer.adaLN_modulation.1":  # BFL orders the final modulation (scale, shift); diffusers (shift, scale)
        b = _swap_scale_shift(b)
    return a, b


# ----- the layouts: each returns a {key: tensor} dict (and safetensors metadata where the layout has some) -----------

def diffusers_layout(update: Update, alpha: float | None = None, dtype=torch.float32) -> tuple[dict, dict | None]:
    """diffusers' own writer, with lora_alpha = alpha (default rank / 2) in the adapter metadata."""
    from diffusers import FluxPipeline

    alpha = alpha or update.rank / 2
    scale = alpha / update.rank  # the loader multiplies B @ A by alpha / rank: store B / scale
    tr = {f"{m}.lora_A.weight": _t(a, dtype) for m, (a, _) in update.transformer.items()}
    tr |= {f"{m}.lora_B.weight": _t(b / scale, dtype) for m, (_, b) in update.transformer.items()}
    te = {f"{m}.lora_A.weight": _t(a, dtype) for m, (a, _) in update.text_encoder.items()}
    te |= {f"{m}.lora_B.weight": _t(b / scale, dtype) for m, (_, b) in update.text_encoder.items()}

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


def ai_toolkit_layout(update: Update, dtype=torch.float32) -> tuple[dict, None]:
    assert not update.text_encoder, "ai-toolkit FLUX LoRAs carry no text encoder"
    out = {}
    for m, (a, b) in update.transformer.items():
        out[f"transformer.{m}.lora_A.weight"] = _t(a, dtype)
        out[f"transformer.{m}.lora_B.weight"] = _t(b, dtype)
    return out, None


def _down_up_alpha(out: dict, prefix: str, a, b, rank: int, alpha: float, dtype):
    scale = alpha / rank  # the converters multiply lora_down by alpha / rank: store A / scale
    out[f"{prefix}.lora_down.weight"] = _t(a / scale, dtype)
    out[f"{prefix}.lora_up.weight"] = _t(b, dtype)
    out[f"{prefix}.alpha"] = torch.tensor(float(alpha), dtype=dtype)


def _down_up_layout(update: Update, module_key, text_key, alpha: float | None, dtype) -> tuple[dict, None]:
    """lora_down / lora_up / alpha files; alpha defaults to rank / 2. diffusers applies no alpha to the final layer
    of these layouts (its converter's TODO), so the final layer is written with alpha = rank."""
    alpha = alpha or update.rank / 2
    out = {}
    for bfl in update.groups:
        fused = _fused(update, bfl)
        if fused is not None:
            own = update.rank if bfl.startswith("final_layer") else alpha
            _down_up_alpha(out, module_key(bfl), *fused, update.rank, own, dtype)
    for m, (a, b) in update.text_encoder.items():
        _down_up_alpha(out, text_key(m), a, b, update.rank, alpha, dtype)
    return out, None


def kohya_layout(update: Update, alpha: float | None = None, dtype=torch.float32) -> tuple[dict, None]:
    """sd-scripts keys: lora_unet_<bfl name with _>, CLIP as lora_te1_<name with _>."""
    return _down_up_layout(update, lambda bfl: "lora_unet_" + bfl.replace(".", "_"),
                           lambda m: "lora_te1_" + m.replace(".", "_"), alpha, dtype)


def bfl_layout(update: Update, alpha: float | None = None, dtype=torch.float32) -> tuple[dict, None]:
    """BFL module names as ComfyUI writes them: diffusion_model.<bfl>.lora_down/lora_up/alpha."""
    return _down_up_layout(update, lambda bfl: f"diffusion_model.{bfl}",
                           lambda m: f"text_encoders.clip_l.transformer.{m}", alpha, dtype)


def bfl_peft_layout(update: Update, dtype=torch.float32) -> tuple[dict, None]:
    """BFL module names with PEFT's lora_A / lora_B and no prefix or alpha (BFL's own LoRA code)."""
    assert not update.text_encoder
    out = {}
    for bfl in update.groups:
        fused = _fused(update, bfl)
        if fused is not None:
            out[f"{bfl}.lora_A.weight"] = _t(fused[0], dtype)
            out[f"{bfl}.lora_B.weight"] = _t(fused[1], dtype)
    return out, None


def fal_layout(update: Update, dtype=torch.float32) -> tuple[dict, None]:
    """fal's trainer: BFL module names with PEFT's lora_A / lora_B under `base_model.model.`."""
    out, _ = bfl_peft_layout(update, dtype)
    return {f"base_model.model.{k}": v for k, v in out.items()}, None


def xlabs_layout(update: Update, dtype=torch.float32) -> tuple[dict, None]:
    """XLabs keys: the attention of the double blocks, q/k/v and the output of the single blocks (subset XLABS)."""
    assert not update.text_encoder
    out = {}
    for group in update.groups:
        kind, index, module = group.split(".", 2)
        if kind == "double_blocks":
            name = next((x for x, b in XLABS_DOUBLE.items() if b == module), None)
        else:
            name = module if module in XLABS_SINGLE else None
        if name is None:
            raise AssertionError(f"xlabs cannot express {group}")
        fused = _fused(update, group)
        if fused is not None:
            out[f"{kind}.{index}.processor.{name}.down.weight"] = _t(fused[0], dtype)
            out[f"{kind}.{index}.processor.{name}.up.weight"] = _t(fused[1], dtype)
    return out, None


def peft_layout(update: Update, prefix: str = "base_model.model.", dtype=torch.float32) -> tuple[dict, None]:
    """PEFT's own keys: diffusers module names under the PEFT wrapper's prefix, no alpha (PeftModel.save_pretrained
    keeps lora_alpha in adapter_config.json beside the file)."""
    assert not update.text_encoder
    out = {}
    for m, (a, b) in update.transformer.items():
        out[f"{prefix}{m}.lora_A.weight"] = _t(a, dtype)
        out[f"{prefix}{m}.lora_B.weight"] = _t(b, dtype)
    return out, None


def onetrainer_layout(update: Update, alpha: float | None = None, dtype=torch.float32) -> tuple[dict, None]:
    """OneTrainer's keys: every diffusers module apart (no fused qkv), `.` as `_`, with its alpha (default rank / 2)."""
    alpha = alpha or update.rank / 2
    out = {}
    for m, (a, b) in update.transformer.items():
        _down_up_alpha(out, "lora_transformer_" + m.replace(".", "_"), a, b, update.rank, alpha, dtype)
    for m, (a, b) in update.text_encoder.items():
        _down_up_alpha(out, "lora_te1_" + m.replace(".", "_"), a, b, update.rank, alpha, dtype)
    return out, None


# T5 (text_encoder_2) module names as each trainer writes them: T5 factors are named in the log, never applied.
T5_NAMING = {
    "kohya": lambda m: "lora_te3_" + m.replace(".", "_"),
    "onetrainer": lambda m: "lora_te2_" + m.replace(".", "_"),
    "comfyui": lambda m: "text_encoders.t5xxl.transformer." + m,
}


def t5_tensors(naming: str, blocks: int = 2, rank: int = RANK, seed: int = 0) -> dict:
    """Random low-rank T5 factors (q, k, v, o of each encoder block, 64 wide: they are never applied, so no width is
    checked) in a trainer's names: 4 modules per block, 3 tensors each (down, up, alpha)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(blocks):
        for part in "qkvo":
            name = T5_NAMING[naming](f"encoder.block.{i}.layer.0.SelfAttention.{part}")
            out[f"{name}.lora_down.weight"] = torch.randn(rank, 64, generator=gen)
            out[f"{name}.lora_up.weight"] = torch.randn(64, rank, generator=gen)
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


LAYOUTS = {
    "diffusers": diffusers_layout,
    "ai-toolkit": ai_toolkit_layout,
    "kohya": kohya_layout,
    "xlabs": xlabs_layout,
    "bfl": bfl_layout,
    "bfl-peft": bfl_peft_layout,
    "fal": fal_layout,
}


# ----- LyCORIS -----------------------------------------------------------------------------------------------------



def _kron_split(n: int) -> int:
    return 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1


def lycoris_file(transformer, kind: str = "lokr", naming: str = "bfl", modules: str = "ALL", variant: str = "w2",
                 seed: int = 0, rank: int = RANK, alpha: float | None = None) -> tuple[dict, dict[str, tuple[str, ...]]]:
    """Random LoKr (kind "lokr") or LoHa ("loha") tensors over a module subset, with alpha (default rank / 2), named
    the kohya way after BFL's modules (naming "bfl": `lora_unet_double_blocks_0_img_attn_qkv`, fused qkv / linear1)
    or the LyCORIS way after diffusers' (naming "diffusers": `lycoris_transformer_blocks_0_attn_to_q`); "bfl-dotted"
    and "diffusers-dotted" are the same with dots (`diffusion_model.double_blocks.0.img_attn.qkv`,
    `transformer.transformer_blocks.0.attn.to_q`).

    Returns the tensors and, per file module, the diffusers modules it stands for (rows in that order)."""
    gen = torch.Generator().manual_seed(seed)
    alpha = alpha or rank / 2
    tensors, targets = {}, {}
    for bfl, members in subset(transformer, modules).items():
        if naming == "bfl":
            units = [("lora_unet_" + bfl.replace(".", "_"), members)]
        elif naming == "bfl-dotted":  # ComfyUI's / ai-toolkit's BFL form
            units = [(f"diffusion_model.{bfl}", members)]
        elif naming == "diffusers-dotted":  # ai-toolkit's diffusers form
            units = [(f"transformer.{m}", (m,)) for m in members]
        else:
            units = [("lycoris_" + m.replace(".", "_"), (m,)) for m in members]
        for name, ms in units:
            out, inner = sum(_linear(transformer, m).out_features for m in ms), _linear(transformer, ms[0]).in_features
            targets[name] = ms

            def randn(*shape, std=1.0):
                return torch.randn(*shape, generator=gen) * std

            if kind == "loha":
                for w in ("hada_w1", "hada_w2"):
                    tensors[f"{name}.{w}_a"] = randn(out, rank, std=0.5)
                    tensors[f"{name}.{w}_b"] = randn(rank, inner, std=1 / inner**0.5)
            else:
                a, c = _kron_split(out), _kron_split(inner)
                b, d = out // a, inner // c
                if variant == "both":
                    tensors[f"{name}.lokr_w1_a"] = randn(a, rank, std=0.5)
                    tensors[f"{name}.lokr_w1_b"] = randn(rank, c, std=0.5)
                else:
                    tensors[f"{name}.lokr_w1"] = randn(a, c, std=0.5)
                if variant == "full":
                    tensors[f"{name}.lokr_w2"] = randn(b, d, std=1 / d**0.5)
                else:
                    tensors[f"{name}.lokr_w2_a"] = randn(b, rank, std=0.5)
                    tensors[f"{name}.lokr_w2_b"] = randn(rank, d, std=1 / d**0.5)
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return tensors, targets


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    return save(tensors, metadata=metadata)


def lora_bytes(update: Update, layout: str, **options) -> bytes:
    return safetensors_bytes(*LAYOUTS[layout](update, **options))


def write(update: Update, layout: str, path: Path, **options) -> Path:
    path.write_bytes(lora_bytes(update, layout, **options))
    return path


def lora_uri(update: Update, layout: str = "diffusers", **options) -> str:
    """The update as a LoRA file in a data: URI (no server needed)."""
    return data_uri(lora_bytes(update, layout, **options), "application/octet-stream")


def tar_of(files: dict[str, bytes], mode: str = "w") -> bytes:
    """A .tar holding these files (as Replicate's trainer packs its output); `mode` "w:gz" etc. compresses it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def civitai_model_json(model_id: int, version_ids: list[int]) -> bytes:
    """What CivitAI's /api/v1/models/<id> answers, reduced to the fields the loader reads."""
    return json.dumps({
        "id": model_id, "name": "tiny", "type": "LORA",
        "modelVersions": [{"id": v, "name": f"v{v}", "baseModel": "Flux.1 D"} for v in version_ids],
    }).encode()
