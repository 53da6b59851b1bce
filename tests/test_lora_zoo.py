"""The LoRA zoo: one entry per key-naming scheme that real tools write for FLUX.1, each with where its names come
from, sent through the engine (flux.engine, as a prediction runs) on bf16 and on go_fast.

An entry that loads must change the image on both paths, keep go_fast's fp8 copy in step, and leave the serving
weights equal to diffusers' own fused result (its converters, PEFT's layers, `fuse_lora` on a float32 copy) where
diffusers loads the file, else to the change the tool that wrote it intends (W + scale * ΔW, computed here from the
update the file was written from). An entry that is refused must be refused on both paths in words naming what it is,
with every weight left as it was. A new scheme is one more entry in SCHEMES.

The tiny FLUX cannot hold a single block's fused `linear1` (diffusers splits it at FLUX.1's widths, written into its
converter): the kohya and ComfyUI entries leave it out here; tests/test_lora_width.py fuses it at FLUX.1's width.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from flux import output
from flux.errors import UserError
from tests.helpers import loras
from tests.helpers.images import data_uri
from tests.test_lora import KW, engine_request, peft_fused
from tests.test_lycoris import expected_changes

SCALE = 0.7


@dataclass(frozen=True)
class File:
    """A LoRA file as a tool writes it, and what it should do."""

    tensors: dict
    metadata: dict | None = None
    # "<component>.<module>" -> ΔW at scale 1 as the tool that wrote it applies it: for files diffusers cannot load
    intended: dict | None = None
    # the file as diffusers loads it, where diffusers needs a step first (float32 factors, no PEFT wrapper)
    for_diffusers: Callable[[dict], dict] | None = None
    unapplied: int = 0  # T5 tensors: named in the log, counted in lora_unapplied_tensors, not applied
    differences: int = 0  # ComfyUI's bias and norm differences (.diff_b, .diff): the same


@dataclass(frozen=True)
class Scheme:
    name: str
    cite: str  # where its key names come from: a converter, a trainer's save code, an issue
    build: Callable[[torch.nn.Module, torch.nn.Module], File]
    refused: str | None = None  # the refusal's words (a regular expression), for schemes that are not applied


def _update(t, modules, clip=None, seed=0):
    return loras.make_update(t, modules, text_encoder=clip, seed=seed)


def _intended(update: loras.Update) -> dict:
    """What a LoRA written from this update changes, at scale 1 (the writers store it so that it is exactly B @ A)."""
    return ({f"transformer.{m}": b @ a for m, (a, b) in update.transformer.items()}
            | {f"text_encoder.{m}": b @ a for m, (a, b) in update.text_encoder.items()})


def _float32(tensors: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _unwrapped(tensors: dict) -> dict:
    """PEFT's wrapper prefix removed: what diffusers loads."""
    out = {}
    for k, v in tensors.items():
        for prefix in ("transformer.base_model.model.", "base_model.model."):
            if k.startswith(prefix):
                k = "transformer." + k[len(prefix):]
                break
        out[k] = v
    return out


def _kohya(t, clip, seed, dtype=torch.float32, alpha=3.0, t5=False):
    tensors, _ = loras.kohya_layout(_update(t, "FUSED_OK", clip, seed), alpha=alpha, dtype=dtype)
    extra = loras.t5_tensors("kohya") if t5 else {}
    return File(tensors | extra, for_diffusers=_float32 if dtype != torch.float32 else None, unapplied=len(extra))


def _kohya_split_qkv(t, clip):
    """sd-scripts' split_qkv: q, k and v trained apart and saved as one fused module, lora_down stacked (3r x in) and
    lora_up block-diagonal (3 out x 3r)."""
    update = _update(t, "ATTENTION", seed=21)
    tensors = {}
    for bfl, members in update.groups.items():
        name = "lora_unet_" + bfl.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.cat([update.transformer[m][0] for m in members])
        tensors[f"{name}.lora_up.weight"] = torch.block_diag(*(update.transformer[m][1] for m in members))
        tensors[f"{name}.alpha"] = torch.tensor(float(update.rank) / 2)
    return File(tensors)


def _alpha_tensors(t, clip):
    """PEFT keys with a `.alpha` tensor per module (diffusers' network alphas)."""
    update = _update(t, "ATTENTION", seed=22)
    tensors, _ = loras.ai_toolkit_layout(update)
    for name in update.transformer:
        tensors[f"transformer.{name}.lora_B.weight"] = tensors[f"transformer.{name}.lora_B.weight"] * 2
        tensors[f"transformer.{name}.alpha"] = torch.tensor(float(update.rank) / 2)
    return File(tensors)


def _kohya_integer_alpha(t, clip):
    file = _kohya(t, clip, 23, alpha=2.0)
    return File({k: v.to(torch.int64) if k.endswith(".alpha") else v for k, v in file.tensors.items()})


def _comfyui(t, clip, seed=24, t5=False, differences=False):
    tensors, _ = loras.bfl_layout(_update(t, "FUSED_OK", clip, seed), alpha=3.0)
    extra = loras.t5_tensors("comfyui") if t5 else {}
    diffs = {}
    if differences:  # ComfyUI's extract with its bias option: a layer's bias difference, a norm's scale difference
        block = t.transformer_blocks[0]
        diffs = {"diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.full((3 * block.attn.to_q.out_features,),
                                                                                     0.01),
                 "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": torch.full(
                     (block.attn.norm_q.weight.shape[0],), 0.01)}
    return File(tensors | extra | diffs, unapplied=len(extra), differences=len(diffs))


def _onetrainer(t, clip):
    update = _update(t, "ALL", clip, 25)
    tensors, _ = loras.onetrainer_layout(update, alpha=2.0)
    extra = loras.t5_tensors("onetrainer")
    return File(tensors | extra, intended=_intended(update), unapplied=len(extra))


def _onetrainer_attention(t, clip):
    tensors, _ = loras.onetrainer_layout(_update(t, "ATTENTION", seed=26), alpha=2.0)
    return File(tensors)


def _peft(prefix, seed):
    def build(t, clip):
        tensors, _ = loras.peft_layout(_update(t, "ALL", seed=seed), prefix)
        return File(tensors, for_diffusers=_unwrapped)
    return build


def _lycoris(kind, naming, seed):
    def build(t, clip):
        tensors, targets = loras.lycoris_file(t, kind, naming, "BLOCKS", seed=seed)
        return File(tensors, intended={f"transformer.{m}": d for m, d in expected_changes(t, tensors, targets).items()})
    return build


def _with(build, **extra):
    def changed(t, clip):
        file = build(t, clip)
        return File({**file.tensors, **{k: v(file.tensors) for k, v in extra.items()}})
    return changed


SCHEMES = [
    Scheme("diffusers dreambooth, adapter metadata, CLIP",
           "diffusers examples/dreambooth/train_dreambooth_lora_flux.py: FluxPipeline.save_lora_weights with "
           "*_lora_adapter_metadata (diffusers loaders/lora_pipeline.py)",
           lambda t, c: File(*loras.diffusers_layout(_update(t, "ALL", c, 11), alpha=3.0))),
    Scheme("ai-toolkit", "ostris/ai-toolkit (Replicate's FLUX trainer): PEFT keys under transformer., no alpha",
           lambda t, c: File(*loras.ai_toolkit_layout(_update(t, "ALL", seed=12)))),
    Scheme("TheLastBen, PEFT keys with alpha tensors",
           "diffusers FluxLoraLoaderMixin.lora_state_dict(return_alphas=True): network alphas beside PEFT keys",
           _alpha_tensors),
    Scheme("PEFT save_pretrained", "peft utils/save_and_load.py: PeftModel.save_pretrained keeps the wrapper's "
           "base_model.model. prefix", _peft("base_model.model.", 13)),
    Scheme("SimpleTuner PEFT", "SimpleTuner's PEFT saves: transformer.base_model.model.<module> (issue 28)",
           _peft("transformer.base_model.model.", 14)),
    Scheme("kohya, CLIP, float alpha", "sd-scripts networks/lora_flux.py: lora_unet_<BFL module>, CLIP lora_te1_",
           lambda t, c: _kohya(t, c, 15)),
    Scheme("kohya, integer alpha", "sd-scripts networks/lora_flux.py: alpha saved as an integer tensor",
           _kohya_integer_alpha),
    Scheme("kohya split_qkv", "sd-scripts networks/lora_flux.py split_qkv: block-diagonal lora_up; diffusers "
           "_convert_kohya_flux_lora_to_diffusers splits it (is_sparse)", _kohya_split_qkv),
    Scheme("kohya, CLIP and T5", "sd-scripts networks/lora_flux.py LORA_PREFIX_TEXT_ENCODER_T5 = lora_te3",
           lambda t, c: _kohya(t, c, 16, t5=True)),
    Scheme("kohya fp8 e4m3", "nunchaku#245: kohya LoRAs saved as float8_e4m3fn",
           lambda t, c: _kohya(t, c, 17, dtype=torch.float8_e4m3fn)),
    Scheme("kohya fp8 e5m2", "sd-scripts --save_precision, torch.float8_e5m2",
           lambda t, c: _kohya(t, c, 18, dtype=torch.float8_e5m2)),
    Scheme("kohya bf16", "sd-scripts --save_precision bf16", lambda t, c: _kohya(t, c, 19, dtype=torch.bfloat16)),
    Scheme("kohya fp16", "sd-scripts --save_precision fp16", lambda t, c: _kohya(t, c, 20, dtype=torch.float16)),
    Scheme("ComfyUI, CLIP", "ComfyUI's saved LoRAs: diffusion_model.<BFL module>, text_encoders.clip_l.transformer. "
           "(diffusers _convert_kohya_flux_lora_to_diffusers, ComfyUI branch)", lambda t, c: _comfyui(t, c)),
    Scheme("ComfyUI, CLIP and T5", "ComfyUI: text_encoders.t5xxl.transformer. (dropped by diffusers' converter too)",
           lambda t, c: _comfyui(t, c, 27, t5=True)),
    Scheme("ComfyUI extract with bias and norm differences", "ComfyUI comfy_extras/nodes_lora_extract.py (bias_diff): "
           "<module>.diff_b and 1-D <weight>.diff beside the factors; diffusers' FLUX converters drop them",
           lambda t, c: _comfyui(t, c, 39, differences=True)),
    Scheme("XLabs", "diffusers _convert_xlabs_flux_lora_to_diffusers: double_blocks.N.processor.qkv_lora1",
           lambda t, c: File(*loras.xlabs_layout(_update(t, "XLABS", seed=28)))),
    Scheme("BFL PEFT", "BFL's flux repo: BFL module names with PEFT's lora_A/lora_B",
           lambda t, c: File(*loras.bfl_peft_layout(_update(t, "FUSED_OK", seed=29)))),
    Scheme("fal", "replicate/cog-flux#54: fal's trainer, BFL names under base_model.model.",
           lambda t, c: File(*loras.fal_layout(_update(t, "FUSED_OK", seed=30)))),
    Scheme("OneTrainer full, CLIP and T5", "OneTrainer modules/modelSaver/flux/FluxLoRASaver.py, its own format: "
           "lora_transformer_<diffusers module>, CLIP lora_te1_, T5 lora_te2_ (issue 28; diffusers' "
           "_convert_mixture_state_dict_to_diffusers asserts on lora_te2_ and collapses non-attention modules)",
           _onetrainer),
    Scheme("OneTrainer attention-only", "OneTrainer, attention layers only: diffusers "
           "_convert_mixture_state_dict_to_diffusers loads it",
           _onetrainer_attention),
    Scheme("LyCORIS LoKr, kohya names", "LyCORIS lycoris/modules/lokr.py saved by sd-scripts: lora_unet_<BFL "
           "module>.lokr_w1", _lycoris("lokr", "bfl", 31)),
    Scheme("LyCORIS LoHa, SimpleTuner names", "SimpleTuner + LyCORIS: lycoris_<diffusers module>.hada_w1_a",
           _lycoris("loha", "diffusers", 32)),
    Scheme("DoRA", "sd-scripts / LyCORIS DoRA: .dora_scale beside the factors",
           _with(lambda t, c: _kohya(t, c, 33), **{"lora_unet_double_blocks_0_img_attn_proj.dora_scale":
                                                    lambda f: torch.ones(1, 32)}),
           refused=r"is a DoRA \(lora_unet_double_blocks_0_img_attn_proj\.dora_scale\).*not DoRA"),
    Scheme("lora_B bias", "PEFT LoraConfig(lora_bias=True): lora_B.bias",
           _with(lambda t, c: File(*loras.ai_toolkit_layout(_update(t, "ATTENTION", seed=34))),
                 **{"transformer.transformer_blocks.0.attn.to_q.lora_B.bias": lambda f: torch.ones(32)}),
           refused=r"a bias for lora_B \(PEFT's lora_bias\)"),
    Scheme("BFL control LoRA", "BFL FLUX.1-Canny/Depth-dev-lora: query_norm.scale beside the LoRA factors",
           _with(lambda t, c: File(*loras.bfl_peft_layout(_update(t, "ATTENTION", seed=35))),
                 **{"double_blocks.0.img_attn.norm.query_norm.scale": lambda f: torch.ones(16)}),
           refused=r"FLUX Control LoRA \(Canny/Depth\).*control image"),
    Scheme("T5 only", "sd-scripts networks/lora_flux.py trained with only the T5 encoder (lora_te3_)",
           lambda t, c: File(loras.t5_tensors("kohya")),
           refused=r"holds only weights this loader does not apply \(T5 text-encoder weights"),
]


# ----- through the engine ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(engine):
    pipe = engine.pipeline("dev", "txt2img")
    return pipe.transformer, pipe.text_encoder


def run(engine, tmp_path, **inputs) -> output.Prediction:
    request = engine_request(**{**KW, "num_inference_steps": 1, **inputs})  # one step: the weights are compared
    return output.write(engine.run(request), tmp_path / f"out-{len(list(tmp_path.iterdir()))}")


def image(engine, tmp_path, **inputs) -> bytes:
    return run(engine, tmp_path, **inputs).files[0].read_bytes()


@pytest.fixture(scope="module")
def plain(engine, models, tmp_path_factory):
    """The images without a LoRA (bf16, go_fast), and float32 copies of the weights as they were."""
    tmp = tmp_path_factory.mktemp("plain")
    images = {fast: image(engine, tmp, go_fast=fast) for fast in (False, True)}
    originals = tuple(copy.deepcopy(m).float() for m in models)
    return images, originals


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters()}


def _hand_merged(originals, intended: dict, scale: float) -> tuple[dict, dict]:
    """The weights a file's tool intends: W + scale * ΔW for each module it names."""
    out = []
    for module, component in zip(originals, ("transformer", "text_encoder")):
        weights = {n: p.clone() for n, p in _weights(module).items()}
        for name, delta in intended.items():
            if name.startswith(component + "."):
                name = name[len(component) + 1:]
                if name not in dict(module.named_modules()):
                    name = name.removeprefix("text_model.")  # recent transformers flatten CLIPTextModel
                weights[f"{name}.weight"] += scale * delta
        out.append(weights)
    return tuple(out)


def _fused_from_parts(weights: dict) -> dict:
    """The fused q/k/v projections (FLUX_FUSED_PROJECTIONS: the serving model's to_qkv, whose rows the separate
    layers are views of) as the reference's separate layers make them; the reference's own copies of the fused
    weights do not follow its parts (PEFT's fuse replaces a weight's tensor)."""
    from flux.speed.projections import FUSED

    out = dict(weights)
    for name in weights:
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                if name.endswith(f".{fused}.{kind}"):
                    prefix = name[: -len(f"{fused}.{kind}")]
                    out[name] = torch.cat([weights[f"{prefix}{p}.{kind}"] for p in parts])
    return out


def _close(live: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal to float tolerance: one rounding into the live dtype apart."""
    rtol = 1e-5 if live.dtype == torch.float32 else 2.0 ** -7
    return torch.allclose(live.float(), expected, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES, ids=[s.name for s in SCHEMES])
def test_every_scheme_loads_as_its_writer_intends_or_is_refused_in_words(engine, models, plain, tmp_path, caplog,
                                                                         scheme):
    images, originals = plain
    file = scheme.build(*originals)
    uri = data_uri(loras.safetensors_bytes(file.tensors, file.metadata), "application/octet-stream")
    if scheme.refused:
        for fast in (False, True):
            image(engine, tmp_path, go_fast=fast)  # no LoRA: every weight as it was
            with pytest.raises(UserError, match=scheme.refused):
                run(engine, tmp_path, go_fast=fast, replicate_weights=uri)
            assert all(torch.equal(p.float(), _weights(o)[n]) for m, o in zip(models, originals)
                       for n, p in _weights(m).items())
        return

    with caplog.at_level(logging.WARNING, logger="flux"):
        got = run(engine, tmp_path, replicate_weights=uri, lora_scale=SCALE)
    assert got.files[0].read_bytes() != images[False], "the LoRA changed nothing"
    assert got.metrics["lora_unapplied_tensors"] == file.unapplied + file.differences
    if file.unapplied:
        assert f"T5 text-encoder weights ({file.unapplied} tensors" in caplog.text and "not applied" in caplog.text
    if file.differences:
        assert "bias differences (.diff_b) (1 tensors)" in caplog.text and "(.diff) (1 tensors)" in caplog.text

    if file.intended is not None:
        expected = _hand_merged(originals, file.intended, SCALE)
    else:
        path = tmp_path / "for-diffusers.safetensors"
        tensors = file.for_diffusers(file.tensors) if file.for_diffusers else file.tensors
        path.write_bytes(loras.safetensors_bytes(tensors, file.metadata))
        expected = peft_fused(*originals, path, SCALE)
    expected = tuple(_fused_from_parts(e) for e in expected)
    changed = 0
    for module, reference, original in zip(models, expected, originals):
        before = _weights(original)
        for name, live in _weights(module).items():
            assert _close(live, reference[name]), (scheme.name, name)
            changed += not torch.equal(live.float(), before[name])
    assert changed

    fast = image(engine, tmp_path, go_fast=True, replicate_weights=uri, lora_scale=SCALE)
    assert fast != images[True]
    twin = engine.transformers.twins["dev"]
    assert twin.lora == engine.loras.state("dev") and twin.touched == engine.loras.touched("dev") != set()
