"""LoRAs with FLUX.1's widths written into their converters, fused into a transformer of FLUX.1's width.

diffusers splits a fused BFL module at FLUX.1-dev's sizes (a single block's `linear1` into q, k, v of 3072 rows and
the MLP of 12288; a double block's `qkv` into three), which the tiny FLUX cannot match. Here the transformer has
FLUX.1's widths (hidden 3072, 24 heads of 128, MLP 12288) and two double and two single blocks: about 1e9 parameters,
2 GB in bf16 on the CPU, built once for the module (flux/fakes/fullsize.py's config, as `script/benchmark fp8-copy`
builds it). Each scheme that holds the fused modules (kohya and ComfyUI `linear1` and `qkv`, BFL's own PEFT names,
fal's) is fused on the bf16 transformer with fused projections (FLUX_FUSED_PROJECTIONS) and on go_fast's fp8 copy,
and compared with the weights diffusers' conversion gives: W + scale * B @ A for each module diffusers' converter
makes (in float32, rounded once). Weights are compared, not images, on sampled rows that include every split's
edges. Its cost on this 2-core machine (loaded by other work): about 60 s to build the model and its fp8 copy, and
20 s per scheme (fusing, re-quantizing the touched fp8 layers, restoring); marked `fullwidth`.
"""

from __future__ import annotations

import pytest
import torch

import lora_loader
from flux.fakes import fullsize
from flux.lora import keymaps
from flux.lora.fuse import Adapter, Fp8Twin, LoraManager
from flux.speed import fp8 as fp8_
from flux.speed.projections import FUSED, fuse_projections
from tests.helpers import loras
from tests.test_speed import quantized, raw

SCALE = 0.7
KIND = "fp8wo"  # the fp8 quantization go_fast uses on a CPU (flux/switches.py: fp8_kind)
SCHEMES = ["kohya", "bfl", "bfl-peft", "fal"]  # the low-rank layouts whose fused modules diffusers splits

pytestmark = pytest.mark.fullwidth


@pytest.fixture(scope="module")
def model():
    """The FLUX.1-width transformer (bf16, fused projections), its fp8 twin, and bf16 copies of the weights the
    schemes touch as they were."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"), fullsize.building_in(torch.bfloat16):  # no default init: init_weights draws them
        transformer = FluxTransformer2DModel(**{**fullsize.TRANSFORMER, "num_layers": 2, "num_single_layers": 2})
    assert not list(transformer.buffers())  # to_empty leaves buffers unset: there are none
    transformer = transformer.to_empty(device="cpu")
    fullsize.init_weights(transformer, torch.Generator().manual_seed(0))
    transformer.eval().requires_grad_(False)
    assert transformer.single_transformer_blocks[0].proj_mlp.out_features == 12288
    names = [m for ms in loras.subset(transformer, "FUSED").values() for m in ms]
    fuse_projections(transformer)
    twin = Fp8Twin(fp8_.Fp8Sync(transformer, fp8_.fp8_transformer(transformer, KIND, torch.device("cpu")), KIND))
    originals = {n: transformer.get_submodule(n).weight.detach().clone() for n in names}
    return transformer, twin, originals


def diffusers_changes(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) as diffusers' converters make them from the file (alphas folded in by the converter)."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    tensors = load_file(path)
    kind = lora_loader.layout(list(tensors), None)
    source = keymaps.bfl_to_comfy(tensors) if kind in ("bfl-peft", "fal") else tensors
    state_dict, alphas = FluxPipeline.lora_state_dict(source, return_alphas=True)
    assert not alphas
    pairs = {}
    for key, value in state_dict.items():
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        pairs.setdefault(module, [None, None])[0 if part.startswith("A") else 1] = value.float()
    return {m: (a, b) for m, (a, b) in pairs.items()}


def _rows(count: int) -> torch.Tensor:
    """Rows to compare: both edges of every 3072 rows (q, k, v and the MLP's parts are multiples), and 64 more."""
    edges = [r for start in range(0, count, 3072) for r in (start, start + 1, start + 3070, start + 3071)]
    spread = torch.randperm(count, generator=torch.Generator().manual_seed(count))[:64].tolist()
    return torch.tensor(sorted(set(edges + spread)))


def _fused_weight(transformer, name: str) -> tuple[str, slice] | None:
    """The fused projection (to_qkv, to_added_qkv) a q, k or v layer is a view of, and its rows there."""
    parent, leaf = name.rsplit(".", 1)
    for fused, parts in FUSED.items():
        if leaf in parts:
            attn = transformer.get_submodule(parent)
            rows = attn.get_submodule(leaf).out_features
            start = sum(attn.get_submodule(p).out_features for p in parts[: parts.index(leaf)])
            return f"{parent}.{fused}", slice(start, start + rows)
    return None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_modules_at_flux1_width_fuse_as_diffusers_converts_them_on_bf16_and_fp8(model, tmp_path, scheme):
    transformer, twin, originals = model
    update = loras.make_update(transformer, "FUSED", seed=SCHEMES.index(scheme) + 2)
    path = loras.write(update, scheme, tmp_path / f"{scheme}.safetensors")
    weights = lora_loader.normalize(path, scheme, scheme)
    expected = diffusers_changes(path)
    assert sorted(expected) == sorted(originals) == sorted(weights.deltas_of("transformer"))
    assert {transformer.get_submodule(m).out_features for m in expected} == {3072, 12288}

    manager = LoraManager()
    manager.register("dev", transformer, "transformer")
    manager.use([Adapter(weights, SCALE)], ["dev"])
    for name, (a, b) in expected.items():
        live = transformer.get_submodule(name).weight
        rows = _rows(live.shape[0])  # the edges of every split part, and rows between: a wrong split shows
        reference = (originals[name][rows].float() + SCALE * (b[rows] @ a)).to(torch.bfloat16)
        assert torch.allclose(live[rows].float(), reference.float(), rtol=2.0**-7, atol=1e-6), (scheme, name)
        assert not torch.equal(live[rows], originals[name][rows]), (scheme, name)
        fused = _fused_weight(transformer, name)
        if fused is not None:  # the fused projection the model runs carries it
            assert torch.equal(transformer.get_submodule(fused[0]).weight[fused[1]], live), (scheme, name)

    # go_fast: the fp8 copy follows; the fused q, k, v of a single block (linear1's split) is a fresh quantization
    assert twin.follow(manager, "dev")
    source, fp8 = twin.sync.pairs[id(transformer.single_transformer_blocks[1].attn.to_k.weight)]
    fresh = quantized(source, KIND)
    assert torch.equal(raw(fp8.weight.qdata), raw(fresh.qdata)) and torch.equal(fp8.weight.scale, fresh.scale)

    manager.use([], ["dev"])
    assert all(torch.equal(transformer.get_submodule(n).weight, w) for n, w in originals.items())
