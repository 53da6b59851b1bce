"""Tiny LoRAs for the tiny FLUX, written in every layout in use, from one low-rank update.

An `Update` (flux/fakes/loras.py: its module subsets, and the builder benchmarks use too) is a set of low-rank weight
changes: for each target module (diffusers name), A (rank x in) and B (out x rank), so that the module's weight
becomes W + scale * B @ A. The writers below store the same update in each file layout (each layout can express a
different set of modules: EXPRESSIBLE):

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

Alphas are powers of two times the rank, so alpha scaling is exact in floating point and every layout of an update
converts to bit-identical tensors.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from safetensors.torch import save

# make_update too: the tests build their updates as loras.make_update, beside the layouts below
from flux.fakes.loras import (RANK, XLABS_DOUBLE, XLABS_SINGLE, Update, as_stored, diffusers_layout, linear_of,
                              make_update, subset)
from tests.helpers.images import data_uri

# Which layouts can express an update over each module subset (flux/fakes/loras.py).
EXPRESSIBLE = {
    "ATTENTION": ["diffusers", "ai-toolkit", "kohya", "xlabs", "bfl", "bfl-peft", "fal"],
    "XLABS": ["diffusers", "ai-toolkit", "xlabs"],
    "FUSED_OK": ["diffusers", "ai-toolkit", "kohya", "bfl", "bfl-peft", "fal"],
    "ALL": ["diffusers", "ai-toolkit"],
    "BLOCKS": ["diffusers", "ai-toolkit"],
}


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



def ai_toolkit_layout(update: Update, dtype=torch.float32) -> tuple[dict, None]:
    assert not update.text_encoder, "ai-toolkit FLUX LoRAs carry no text encoder"
    out = {}
    for m, (a, b) in update.transformer.items():
        out[f"transformer.{m}.lora_A.weight"] = as_stored(a, dtype)
        out[f"transformer.{m}.lora_B.weight"] = as_stored(b, dtype)
    return out, None


def _down_up_alpha(out: dict, prefix: str, a, b, rank: int, alpha: float, dtype):
    scale = alpha / rank  # the converters multiply lora_down by alpha / rank: store A / scale
    out[f"{prefix}.lora_down.weight"] = as_stored(a / scale, dtype)
    out[f"{prefix}.lora_up.weight"] = as_stored(b, dtype)
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
            out[f"{bfl}.lora_A.weight"] = as_stored(fused[0], dtype)
            out[f"{bfl}.lora_B.weight"] = as_stored(fused[1], dtype)
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
            out[f"{kind}.{index}.processor.{name}.down.weight"] = as_stored(fused[0], dtype)
            out[f"{kind}.{index}.processor.{name}.up.weight"] = as_stored(fused[1], dtype)
    return out, None


def peft_layout(update: Update, prefix: str = "base_model.model.", dtype=torch.float32) -> tuple[dict, None]:
    """PEFT's own keys: diffusers module names under the PEFT wrapper's prefix, no alpha (PeftModel.save_pretrained
    keeps lora_alpha in adapter_config.json beside the file)."""
    assert not update.text_encoder
    out = {}
    for m, (a, b) in update.transformer.items():
        out[f"{prefix}{m}.lora_A.weight"] = as_stored(a, dtype)
        out[f"{prefix}{m}.lora_B.weight"] = as_stored(b, dtype)
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
            out, inner = sum(linear_of(transformer, m).out_features for m in ms), linear_of(transformer, ms[0]).in_features
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
