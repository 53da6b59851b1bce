"""LyCORIS LoKr and LoHa on the tiny FLUX: read in kohya's BFL names and LyCORIS' diffusers names, fused as
W + scale * ΔW (ΔW computed here, independently of the loader), restored bit-exactly, on the fp8 path too; files
that do not fit are refused before anything changes.
"""

from __future__ import annotations

import pytest
import torch

import lora_loader
from flux.fakes import tiny
from flux.errors import UserError
from flux.lora.fuse import Adapter, LoraManager
from tests.helpers import loras
from tests.helpers.images import data_uri
from tests.test_lora import KW, image, no_peft_layers, same, snapshot


@pytest.fixture(scope="module")
def transformer():
    return tiny.build_pipeline().transformer.eval()


def _write(tmp_path, tensors, name="lycoris.safetensors"):
    path = tmp_path / name
    path.write_bytes(loras.safetensors_bytes(tensors))
    return path


def expected_delta(tensors: dict, module: str) -> torch.Tensor:
    """ΔW of one file module as LyCORIS defines it, with its alpha / rank scale (rank: the inner dim of the
    decomposed factor; a LoKr with both factors full is not scaled)."""
    def t(name):
        return tensors.get(f"{module}.{name}")

    alpha = float(t("alpha"))
    if t("hada_w1_a") is not None:
        return (t("hada_w1_a") @ t("hada_w1_b")) * (t("hada_w2_a") @ t("hada_w2_b")) * (alpha / t("hada_w1_b").shape[0])
    w1 = t("lokr_w1") if t("lokr_w1") is not None else t("lokr_w1_a") @ t("lokr_w1_b")
    w2 = t("lokr_w2") if t("lokr_w2") is not None else t("lokr_w2_a") @ t("lokr_w2_b")
    rank = (t("lokr_w1_a").shape[1] if t("lokr_w1_a") is not None
            else t("lokr_w2_a").shape[1] if t("lokr_w2_a") is not None else None)
    return torch.kron(w1, w2) * (alpha / rank if rank else 1.0)


def expected_changes(model, tensors: dict, targets: dict) -> dict[str, torch.Tensor]:
    """diffusers module -> its ΔW: a fused module's product split by rows in the order of its members (the sizes of
    the model's own layers), the final modulation with its halves swapped (BFL: scale, shift; diffusers: shift, scale)."""
    out = {}
    for module, members in targets.items():
        delta = expected_delta(tensors, module)
        if members == ("norm_out.linear",) and "final_layer" in module.replace(".", "_"):
            delta = torch.cat(delta.chunk(2, dim=0)[::-1])
        start = 0
        for name in members:
            rows = model.get_submodule(name).out_features
            out[name] = delta[start:start + rows]
            start += rows
        assert start == delta.shape[0]
    return out


CASES = [("lokr", "bfl", "w2"), ("lokr", "bfl", "both"), ("lokr", "bfl", "full"), ("lokr", "diffusers", "w2"),
         ("lokr", "diffusers", "both"), ("loha", "bfl", "w2"), ("loha", "diffusers", "w2"),
         ("lokr", "bfl-dotted", "w2"), ("loha", "diffusers-dotted", "w2")]


@pytest.mark.parametrize("kind,naming,variant", CASES)
def test_fused_weights_are_w_plus_scale_delta_and_removal_is_exact(transformer, tmp_path, kind, naming, variant):
    tensors, targets = loras.lycoris_file(transformer, kind, naming, "ALL", variant, seed=1)
    weights = lora_loader.normalize(_write(tmp_path, tensors), "k", "lycoris.safetensors")
    assert weights.layout == kind and weights.components == ("transformer",)
    changes = expected_changes(transformer, tensors, targets)
    assert sorted(weights.deltas_of("transformer")) == sorted(changes)

    manager = LoraManager()
    manager.register("dev", transformer, "transformer")
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    manager.use([Adapter(weights, 0.75)], ["dev"])
    assert no_peft_layers(transformer)
    for name, param in transformer.named_parameters():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in changes:
            assert torch.allclose(param, before[name] + 0.75 * changes[module], rtol=1e-5, atol=1e-6), name
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    assert len(manager.touched("dev")) == len(changes)
    manager.use([], ["dev"])
    assert all(torch.equal(p, before[n]) for n, p in transformer.named_parameters())
    assert manager.touched("dev") == set() and no_peft_layers(transformer)


def test_a_lokr_and_a_lora_together(transformer, tmp_path):
    tensors, targets = loras.lycoris_file(transformer, "lokr", "diffusers", "ATTENTION", seed=2)
    lokr = lora_loader.normalize(_write(tmp_path, tensors), "lokr", "lokr")
    update = loras.make_update(transformer, "ATTENTION", seed=3)
    lora = lora_loader.normalize(loras.write(update, "diffusers", tmp_path / "lora.safetensors"), "lora", "lora")
    manager = LoraManager()
    manager.register("dev", transformer, "transformer")
    name = "transformer_blocks.0.attn.to_q"
    weight = transformer.get_submodule(name).weight
    original = weight.detach().clone()
    manager.use([Adapter(lora, -0.5), Adapter(lokr, 2.0)], ["dev"])
    a, b = update.transformer[name]
    change = expected_changes(transformer, tensors, targets)[name]
    assert torch.allclose(weight, original - 0.5 * (b @ a) + 2.0 * change, rtol=1e-5, atol=1e-5)
    manager.use([Adapter(lokr, 1.0)], ["dev"])  # the LoRA goes, the LoKr stays at another scale
    assert torch.allclose(weight, original + change, rtol=1e-5, atol=1e-6)
    manager.use([], ["dev"])
    assert torch.equal(weight, original) and no_peft_layers(transformer)


# ----- through predict(): the image, go_fast, refusals ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dev(engine):
    pipe = engine.pipeline("dev", "txt2img")
    return pipe.transformer, pipe.text_encoder


def uri(tensors: dict) -> str:
    return data_uri(loras.safetensors_bytes(tensors), "application/octet-stream")


@pytest.mark.parametrize("kind,naming", [("lokr", "bfl"), ("loha", "diffusers")])
def test_lycoris_changes_the_image_and_goes_away_exactly(predict, dev, kind, naming):
    plain = image(predict)
    before = snapshot(*dev)
    tensors, _ = loras.lycoris_file(dev[0], kind, naming, "BLOCKS", seed=4)
    assert image(predict, replicate_weights=uri(tensors)) != plain
    assert image(predict) == plain and same(before, *dev) and no_peft_layers(*dev)


def test_go_fast_with_a_lokr(predict, engine, dev):
    """The fp8 path re-quantizes the layers a LoKr touched: it changes the go_fast image, and its removal brings the
    go_fast image back bit-identical."""
    tensors, targets = loras.lycoris_file(dev[0], "lokr", "bfl", "BLOCKS", seed=5)
    plain = image(predict, go_fast=True)
    with_lokr = image(predict, go_fast=True, replicate_weights=uri(tensors))
    assert with_lokr != plain
    touched = engine.loras.touched("dev")
    assert touched and len(touched) == sum(len(m) for m in targets.values())
    from tests.test_speed import quantized, raw

    for key in touched:  # each touched layer's fp8 twin is a fresh quantization of its fused bf16 weight
        source, twin = engine.transformers.twins["dev"].sync.pairs[key]
        if hasattr(twin.weight, "qdata"):
            fresh = quantized(source, engine.settings.fp8)
            assert torch.equal(raw(twin.weight.qdata), raw(fresh.qdata))
            assert torch.equal(twin.weight.scale, fresh.scale)
        else:
            assert torch.equal(twin.weight, source.weight)
    assert image(predict, go_fast=True, replicate_weights=uri(tensors), lora_scale=0.5) not in (plain, with_lokr)
    assert image(predict, go_fast=True) == plain


def test_lokr_whose_factors_do_not_fit_is_refused_and_changes_nothing(predict, dev):
    good, _ = loras.lycoris_file(dev[0], "loha", "diffusers", "ATTENTION", seed=6)
    with_good = image(predict, replicate_weights=uri(good))
    before = snapshot(*dev)
    bad, _ = loras.lycoris_file(dev[0], "lokr", "diffusers", "ATTENTION", seed=7)
    name = "lycoris_transformer_blocks_0_attn_to_k"
    rank, d = bad[f"{name}.lokr_w2_b"].shape
    bad[f"{name}.lokr_w2_b"] = torch.randn(rank, d + 1)  # the product is wider than to_k
    with pytest.raises(UserError, match=r"made for a different model .*: transformer_blocks\.0\.attn\.to_k is 32->32 "
                                        r"here, the LoKr's \(lycoris_transformer_blocks_0_attn_to_k\) is \d+->\d+"):
        predict(**KW, replicate_weights=uri(good), extra_lora=uri(bad))
    assert same(before, *dev) and no_peft_layers(*dev)
    assert image(predict, replicate_weights=uri(good)) == with_good


# ----- the loader's refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({"lycoris_transformer_blocks_0_attn_to_q.lokr_w2_b": torch.randn(3, 8)}),
     r"not a valid lokr file: lycoris_transformer_blocks_0_attn_to_q has LoKr factors that do not multiply"),
    (lambda t: t.pop("lycoris_transformer_blocks_0_attn_to_q.lokr_w1"),
     r"lycoris_transformer_blocks_0_attn_to_q lacks lokr_w1"),
    (lambda t: t.update({"lycoris_transformer_blocks_0_attn_to_q.dora_scale": torch.ones(32, 1)}),
     r"is a DoRA .*dora_scale"),
    (lambda t: t.update({"lycoris_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.ones(2, 2)}),
     r"'lycoris_down_blocks_0_attentions_0_proj_in' names no layer FLUX\.1 has.*diffusers/PEFT.*LoKr and LoHa"),
])
def test_bad_lycoris_files_are_refused_naming_the_module(transformer, tmp_path, change, message):
    tensors, _ = loras.lycoris_file(transformer, "lokr", "diffusers", "ATTENTION", seed=8)
    change(tensors)
    with pytest.raises(lora_loader.LoraError, match=message):
        lora_loader.normalize(_write(tmp_path, tensors), "k", "bad.safetensors")


def test_clip_lokr_in_kohya_names(tmp_path):
    """LyCORIS CLIP modules (kohya's lora_te1_ names) apply to the text encoder, restored exactly after."""
    clip = tiny.build_pipeline().text_encoder.eval()
    gen = torch.Generator().manual_seed(10)
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {f"{name}.lokr_w1": torch.randn(4, 4, generator=gen), f"{name}.alpha": torch.tensor(2.0)}
    layer = clip.get_submodule("text_model.encoder.layers.0.self_attn.q_proj" if hasattr(clip, "text_model")
                               else "encoder.layers.0.self_attn.q_proj")
    b, d = layer.out_features // 4, layer.in_features // 4
    tensors |= {f"{name}.lokr_w2_a": torch.randn(b, 4, generator=gen), f"{name}.lokr_w2_b": torch.randn(4, d, generator=gen)}
    weights = lora_loader.normalize(_write(tmp_path, tensors), "k", "clip-lokr")
    assert weights.components == ("text_encoder",)
    manager = LoraManager()
    manager.register("clip", clip, "text_encoder")
    before = snapshot(clip)
    original = layer.weight.detach().clone()
    manager.use([Adapter(weights, 1.0)], ["clip"])
    expected = original + torch.kron(tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2_a"] @ tensors[f"{name}.lokr_w2_b"]) * 0.5
    assert torch.allclose(layer.weight, expected, rtol=1e-5, atol=1e-6)
    manager.use([], ["clip"])
    assert same(before, clip) and no_peft_layers(clip)
