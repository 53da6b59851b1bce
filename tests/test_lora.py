"""LoRAs through predict() on the tiny FLUX: layouts, scales, caching, exact unloading, failures, secrets.

The LoRA files are built by tests/helpers/loras.py from one random low-rank update and
served by a real HTTP server on 127.0.0.1; Replicate, Hugging Face and CivitAI are
mapped onto it by configuration (FLUX_REPLICATE_URL, HF_ENDPOINT, FLUX_CIVITAI_URL).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from cog import Secret

import lora_loader
from flux.errors import UserError
from flux.lora import delta, keymaps
from tests.helpers import loras
from tests.helpers.images import data_uri
from tests.helpers.http import HubServer

TOKEN = "hf_SECRET_abcdef0123456789"
KW = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=2, seed=7, output_format="png",
          disable_safety_checker=True)


@pytest.fixture(scope="module")
def hub(engine):
    """One server on 127.0.0.1 standing in for replicate.com, huggingface.co, civitai.com and any URL: the session
    engine's loader gets the settings a container set up with these hosts would have."""
    from flux.settings import LoraSettings

    with HubServer() as server, pytest.MonkeyPatch.context() as mp:
        for name in ("FLUX_REPLICATE_URL", "FLUX_CIVITAI_URL", "HF_ENDPOINT"):
            mp.setenv(name, server.base)
        mp.setattr(engine.runner.loader, "settings", LoraSettings.from_env())
        yield server


@pytest.fixture(scope="module")
def dev(engine):
    pipe = engine.pipeline("dev", "txt2img")
    return pipe.transformer, pipe.text_encoder


@pytest.fixture(scope="module")
def attention(dev):
    """The update every layout can express: the attention projections of the double blocks."""
    return loras.make_update(dev[0], "ATTENTION")


def serve(hub, update, layout, name=None, **options) -> str:
    name = name or f"{layout}-{id(update)}"
    return hub.add(f"/files/{name}.safetensors", loras.lora_bytes(update, layout, **options))


def image(predict, **inputs) -> bytes:
    [path] = predict(**{**KW, **inputs})
    return path.read_bytes()


def snapshot(*modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def same(before: list[torch.Tensor], *modules) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, (p for m in modules for p in m.parameters()), strict=True))


def no_peft_layers(*modules) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(isinstance(layer, BaseTunerLayer) for m in modules for layer in m.modules())


@pytest.fixture(scope="module")
def baseline(predict) -> bytes:
    return image(predict)


# ----- layouts -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("subset,layouts", list(loras.EXPRESSIBLE.items()))
def test_one_update_in_every_layout_gives_the_same_image(predict, hub, dev, baseline, subset, layouts):
    """The same low-rank update, written in each layout, gives bit-identical images (the converted tensors are
    identical, alphas being powers of two); and not the image without the LoRA."""
    update = loras.make_update(dev[0], subset, seed=1)
    images = {layout: image(predict, replicate_weights=serve(hub, update, layout)) for layout in layouts}
    assert len(set(images.values())) == 1, {k: hash(v) for k, v in images.items()}
    assert images[layouts[0]] != baseline


def test_text_encoder_weights_are_applied(predict, hub, dev, baseline):
    """CLIP weights in a LoRA (diffusers, kohya and BFL/ComfyUI layouts) are fused into CLIP and change the image."""
    transformer, clip = dev
    update = loras.make_update(transformer, "ATTENTION", text_encoder=clip, seed=2)
    assert image(predict) == baseline
    clean = snapshot(clip)
    images = {layout: image(predict, replicate_weights=serve(hub, update, layout)) for layout in ("diffusers", "kohya", "bfl")}
    assert len(set(images.values())) == 1
    assert not same(clean, clip)
    transformer_only = loras.Update(update.transformer, {}, update.groups)
    assert images["kohya"] != image(predict, replicate_weights=serve(hub, transformer_only, "kohya"))
    assert same(clean, clip)


# ----- scales and combinations ---------------------------------------------------------------------------------------

def test_scales(predict, hub, attention, baseline):
    url = serve(hub, attention, "ai-toolkit", name="scales")
    assert image(predict, replicate_weights=url, lora_scale=0) == baseline
    plus, minus = image(predict, replicate_weights=url, lora_scale=1), image(predict, replicate_weights=url, lora_scale=-1)
    assert len({plus, minus, baseline}) == 3
    assert image(predict, replicate_weights=url, lora_scale=0.5) not in (plus, baseline)


def test_two_loras_combine_and_extra_alone_is_the_main(predict, hub, dev, attention, engine):
    other = loras.make_update(dev[0], "ATTENTION", seed=3)
    a, b = serve(hub, attention, "kohya", name="combine-a"), serve(hub, other, "xlabs", name="combine-b")
    only_a, only_b = image(predict, replicate_weights=a), image(predict, replicate_weights=b)
    both = image(predict, replicate_weights=a, extra_lora=b, extra_lora_scale=0.5)
    assert len({only_a, only_b, both}) == 3
    weight = dev[0].transformer_blocks[0].attn.to_q.weight
    engine.use_loras(engine_request(replicate_weights=a, extra_lora=b, extra_lora_scale=0.5))
    with_both = weight.detach().clone()
    engine.use_loras(engine_request())
    a_q, b_q = attention.transformer["transformer_blocks.0.attn.to_q"], other.transformer["transformer_blocks.0.attn.to_q"]
    expected = weight + a_q[1] @ a_q[0] + 0.5 * (b_q[1] @ b_q[0])
    assert torch.allclose(with_both, expected, atol=1e-6)
    assert image(predict, extra_lora=b) == only_b


def test_the_same_reference_twice_loads_once_with_the_scales_added(predict, hub, attention, caplog):
    url = serve(hub, attention, "ai-toolkit", name="twice")
    single = image(predict, replicate_weights=url, lora_scale=1.0)
    image(predict)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flux"):
        twice = image(predict, replicate_weights=url, lora_scale=0.25, extra_lora=url, extra_lora_scale=0.75)
    assert twice == single
    assert caplog.text.count(" read (") == 1 and "loaded once" in caplog.text


def engine_request(**inputs):
    from flux.request import Request

    return Request.build(prompt="a knitted purple prune", **inputs)


# ----- caching: the same again costs nothing, a scale change no download and no read, a switch one load -------------

def test_same_lora_again_costs_nothing_scale_change_no_reload_switch_one_load(predict, hub, dev, attention, caplog):
    other = loras.make_update(dev[0], "ATTENTION", seed=4)
    a, b = serve(hub, attention, "diffusers", name="cost-a"), serve(hub, other, "diffusers", name="cost-b")
    image(predict, replicate_weights=a)

    def run(**inputs):
        requests = len(hub.requests)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flux"):
            image(predict, **inputs)
        return len(hub.requests) - requests, caplog.text

    requests, logs = run(replicate_weights=a)
    assert requests == 0 and " read (" not in logs and " on dev" not in logs  # nothing at all
    requests, logs = run(replicate_weights=a, lora_scale=0.3)
    assert requests == 0 and " read (" not in logs and "x0.3 on dev" in logs  # re-fused, from memory
    requests, logs = run(replicate_weights=b)
    assert requests == 1 + 1 and logs.count(" read (") == 1  # probe + download, one load
    requests, logs = run(replicate_weights=a)
    assert requests == 0 and logs.count(" read (") == 1  # from the disk cache: one load, no network


def test_no_drift_after_many_loras_bit_identical_to_a_fresh_predictor(predict, hub, dev, attention, baseline):
    transformer, clip = dev
    everything = serve(hub, loras.make_update(transformer, "ALL", text_encoder=clip, seed=5), "diffusers", name="drift")
    extra = serve(hub, attention, "kohya", name="drift-extra")
    for scale, extra_scale in ((1.0, 0), (-0.7, 1.0), (2.5, -1.0), (0.1, 3.0), (3.0, 0.3)):
        image(predict, replicate_weights=everything, lora_scale=scale, extra_lora=extra, extra_lora_scale=extra_scale)
    after = image(predict)
    assert after == baseline
    from predict import Predictor
    from tests.helpers.inputs import defaults

    fresh = Predictor()
    fresh.setup()
    [path] = fresh.predict(**{**defaults(), **KW})
    assert path.read_bytes() == after
    fresh_params = snapshot(fresh.engine.pipeline("dev", "txt2img").transformer, fresh.engine.pipeline("dev", "txt2img").text_encoder)
    assert same(fresh_params, transformer, clip) and no_peft_layers(transformer, clip)


# ----- every reference kind through predict() -----------------------------------------------------------------------

def test_every_reference_kind(predict, hub, attention, engine):
    body = loras.lora_bytes(attention, "kohya")
    expected = image(predict, replicate_weights=serve(hub, attention, "kohya", name="kinds"))
    hub.add("/delivery/v1/trained_model.tar", loras.tar_of({"output/flux_train_replicate/lora.safetensors": body}))
    hub.add("/me/style/_weights", b"", redirect=hub.url("/delivery/v1/trained_model.tar"))
    hub.add("/me/style/versions/v1/_weights", b"", redirect=hub.url("/delivery/v1/trained_model.tar"))
    hub.add_repo("me/style-lora", {"lora.safetensors": body, "README.md": b"# style"})
    hub.add("/api/v1/models/77", loras.civitai_model_json(77, [78]))
    hub.add("/api/download/models/78", body)
    references = [
        "me/style", "me/style/v1", "https://replicate.com/me/style/versions/v1",
        "huggingface.co/me/style-lora", "https://huggingface.co/me/style-lora/resolve/main/lora.safetensors",
        "civitai.com/models/77/style", "https://civitai.com/api/download/models/78",
        hub.url("/files/kinds.safetensors") + "?X-Amz-Signature=abc",
        data_uri(body, "application/octet-stream"),
    ]
    for reference in references:
        engine.use_loras(engine_request())  # start from no LoRA each time
        assert image(predict, replicate_weights=reference) == expected, reference


def test_schnell_gets_the_active_lora(predict, hub, dev, engine):
    update = loras.make_update(dev[0], "FUSED_OK", seed=6)
    url = serve(hub, update, "kohya", name="schnell")
    kw = dict(model="schnell", num_inference_steps=1)
    image(predict)  # dev without LoRA
    plain = image(predict, **kw)
    with_lora = image(predict, replicate_weights=url, **kw)
    assert with_lora != plain
    schnell = engine.pipeline("schnell", "txt2img").transformer
    assert [a.weights.key for a in engine.loras.adapters("schnell")] and engine.loras.adapters("dev") == ()
    assert image(predict, **kw) == plain and not engine.loras.adapters("schnell")
    assert no_peft_layers(schnell)


def test_img2img_uses_the_lora(predict, hub, attention, tmp_path):
    from tests.helpers import images

    src = images.save(images.gradient(256, 256), tmp_path, "in.png")
    url = serve(hub, attention, "ai-toolkit", name="img2img")
    assert image(predict, image=src, prompt_strength=0.9) != image(predict, image=src, prompt_strength=0.9, replicate_weights=url)


# ----- failures leave the predictor exactly as it was ---------------------------------------------------------------

@pytest.fixture(scope="module")
def other_size_update():
    """A LoRA for a FLUX of another width: same module names, other shapes."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    other = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(2, 2, 4))
    return loras.make_update(other, "ATTENTION")


@pytest.mark.parametrize("case,message", [
    ("missing", "was not found"),
    ("unauthorized", "not authorized"),
    ("truncated", "not a safetensors file"),
    ("html", "is a web page"),
    ("pickle", "never loaded"),
    ("sdxl", "not a FLUX LoRA"),
    ("shapes", "made for a different model"),
])
def test_failures_leave_the_predictor_as_it_was(predict, hub, dev, attention, other_size_update, case, message):
    good = serve(hub, attention, "ai-toolkit", name="keep")
    with_good = image(predict, replicate_weights=good)
    before = snapshot(*dev)
    sdxl = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)}
    bad = {
        "missing": lambda: hub.url("/files/none.safetensors"),
        "unauthorized": lambda: hub.add("/files/private.safetensors", b"x", auth="someone"),
        "truncated": lambda: hub.add("/files/cut.safetensors", loras.lora_bytes(attention, "kohya")[:5000]),
        "html": lambda: hub.add("/files/page.safetensors", b"<html><body>Sign in</body></html>"),
        "pickle": lambda: hub.add("/files/lora.ckpt", b"\x80\x04"),
        "sdxl": lambda: hub.add("/files/sdxl.safetensors", loras.safetensors_bytes(sdxl)),
        "shapes": lambda: serve(hub, other_size_update, "ai-toolkit", name="other-size"),
    }[case]()
    with pytest.raises(UserError, match=message):
        predict(**KW, replicate_weights=good, extra_lora=bad)
    assert same(before, *dev) and no_peft_layers(*dev)
    requests = len(hub.requests)
    assert image(predict, replicate_weights=good) == with_good
    assert len(hub.requests) == requests  # still applied: nothing to do


def test_failure_while_fusing_restores_every_target(predict, hub, dev, attention, engine, monkeypatch):
    """A fault while fusing into the text encoder (as a GPU running out of memory would raise), after the
    transformer took the new LoRA: both are put back as they were."""
    transformer, clip = dev
    good = serve(hub, attention, "ai-toolkit", name="fuse-keep")
    with_good = image(predict, replicate_weights=good)
    before = snapshot(transformer, clip)
    other = loras.make_update(transformer, "ALL", text_encoder=clip, seed=8)
    original = delta.Delta.weight

    def weight(self, device=None):
        if self.source.startswith("text_encoder."):
            raise RuntimeError("simulated: CUDA out of memory")
        return original(self, device)

    monkeypatch.setattr(delta.Delta, "weight", weight)
    with pytest.raises(RuntimeError, match="simulated"):
        predict(**KW, replicate_weights=serve(hub, other, "diffusers", name="fuse-fail"))
    monkeypatch.undo()
    assert same(before, transformer, clip) and no_peft_layers(transformer, clip)
    assert image(predict, replicate_weights=good) == with_good


# ----- scales: what PEFT and diffusers would have given ----------------------------------------------------------------

def peft_fused(transformer, clip, path: Path, scale: float):
    """The reference: copies of the modules with the file loaded the way diffusers loads it (its converters, then
    PEFT's layers configured by the file's metadata or alphas), fused at `scale` by PEFT. CLIP goes through PEFT's
    own injection with diffusers' config (diffusers' load_lora_into_text_encoder needs peft >= 0.20). Only copies are
    touched: this is what the serving model no longer runs."""
    import copy

    from diffusers import FluxPipeline
    from diffusers.loaders.lora_base import fuse_text_encoder_lora, set_adapters_for_text_encoder
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    transformer, clip = copy.deepcopy(transformer), copy.deepcopy(clip)
    with safe_open(path, "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    kind = lora_loader.layout(keys, header)
    source = keymaps.bfl_to_comfy(load_file(path)) if kind in ("bfl-peft", "fal") else str(path)
    sd, alphas, metadata = FluxPipeline.lora_state_dict(source, return_alphas=True, return_lora_metadata=True)
    sd = {("transformer." + k if k.startswith(keymaps.TRANSFORMER_ROOTS) else k): v for k, v in sd.items()}
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas or None, transformer=transformer,
                                            adapter_name="a", metadata=metadata)
    transformer.set_adapters(["a"], [scale])
    transformer.fuse_lora(lora_scale=1.0, adapter_names=["a"])
    text = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    if text:
        if not any(".lora_A." in k for k in text):
            text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
        if not hasattr(clip, "text_model"):
            text = {k.removeprefix("text_model."): v for k, v in text.items()}
        config = {k[len("text_encoder."):]: v for k, v in (metadata or {}).items() if k.startswith("text_encoder.")}
        config = config or get_peft_kwargs({k: v.shape[1] for k, v in text.items() if k.endswith("lora_B.weight")},
                                           None, text, is_unet=False)
        inject_adapter_in_model(LoraConfig(**config), clip, adapter_name="a", state_dict=text)
        set_peft_model_state_dict(clip, text, adapter_name="a")
        set_adapters_for_text_encoder(["a"], clip, [scale])
        fuse_text_encoder_lora(clip, lora_scale=1.0, adapter_names=["a"])
    def weights(module):  # PEFT keeps its layers after fusing: the base layer holds the fused weight
        return {n.replace(".base_layer", ""): p.detach() for n, p in module.named_parameters() if "lora_" not in n}

    return weights(transformer), weights(clip)


def _with_metadata(update, **fields) -> bytes:
    from tests.helpers import hostile

    return hostile.metadata_fields(update, **fields)


def _with_alphas(update) -> bytes:
    """PEFT keys with a `.alpha` tensor per module, of two values (diffusers' network alphas)."""
    tensors, _ = loras.ai_toolkit_layout(update)
    for i, name in enumerate(sorted(update.transformer)):
        tensors[f"transformer.{name}.alpha"] = torch.tensor(3.0 if i % 3 else 5.0)
    return loras.safetensors_bytes(tensors)


SCALE_CASES = {
    **{layout: (lambda u, layout=layout: loras.lora_bytes(u, layout, **({"alpha": 3.0} if layout in ("kohya", "bfl", "diffusers") else {})))
       for layout in loras.LAYOUTS},
    "diffusers, rank_pattern and alpha_pattern": lambda u: _with_metadata(
        u, lora_alpha=3.0, alpha_pattern={"transformer_blocks.0.attn.to_q": 7.0, "add_k_proj": 1.5}),
    "diffusers, use_rslora": lambda u: _with_metadata(u, lora_alpha=3.0, use_rslora=True),
    "diffusers, no lora_alpha (PEFT's default)": lambda u: hostile_without(u, "lora_alpha"),
    "PEFT keys with alpha tensors": _with_alphas,
}


def hostile_without(update, field_name: str) -> bytes:
    from tests.helpers import hostile

    return hostile._metadata(update, lambda config: config.pop(f"transformer.{field_name}") and None)


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_every_layout_fuses_what_peft_would_have_given(tmp_path, case):
    """The one fuse mechanism against diffusers and PEFT themselves, on copies: the same weights (float rounding
    aside: PEFT rounds each adapter's change into the weight, this fuser rounds once), CLIP included."""
    from flux.fakes import tiny
    from flux.lora.fuse import Adapter, LoraManager

    pipe = tiny.build_pipeline()
    transformer, clip = pipe.transformer.eval(), pipe.text_encoder.eval()
    with_clip = case in ("diffusers", "kohya", "bfl")
    update = loras.make_update(transformer, "FUSED_OK" if case in ("kohya", "bfl", "bfl-peft", "fal") else "ATTENTION",
                               text_encoder=clip if with_clip else None, seed=12)
    if case == "xlabs":
        update = loras.make_update(transformer, "XLABS", seed=12)
    path = tmp_path / "lora.safetensors"
    path.write_bytes(SCALE_CASES[case](update))
    expected_transformer, expected_clip = peft_fused(transformer, clip, path, 0.7)
    manager = LoraManager()
    manager.register("dev", transformer, "transformer")
    manager.register("clip", clip, "text_encoder")
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    clip_before = snapshot(clip)
    manager.use([Adapter(lora_loader.normalize(path, "k", case), 0.7)], ["dev", "clip"])
    changed = [n for n, p in transformer.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    for name, param in transformer.named_parameters():
        assert torch.allclose(param, expected_transformer[name], rtol=1e-5, atol=1e-6), (case, name)
    for name, param in clip.named_parameters():
        assert torch.allclose(param, expected_clip[name], rtol=1e-5, atol=1e-6), (case, name)
    assert with_clip != same(clip_before, clip)


# ----- secrets ------------------------------------------------------------------------------------------------------

def test_tokens_never_reach_logs_messages_or_file_names(predict, hub, attention, weights_dir, caplog):
    hub.add_repo("me/gated-style", {"style.safetensors": loras.lora_bytes(attention, "kohya")}, gated_token=TOKEN)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(UserError) as refused:
            predict(**KW, replicate_weights="huggingface.co/me/gated-style", hf_api_token=Secret("hf_wrong_SECRET"))
        image(predict, replicate_weights="huggingface.co/me/gated-style", hf_api_token=Secret(TOKEN))
    assert "hf_api_token" in str(refused.value) and "SECRET" not in str(refused.value)
    assert "SECRET" not in caplog.text
    assert not [p for p in weights_dir.rglob("*") if "SECRET" in p.name]
    assert "SECRET" not in repr(engine_request(hf_api_token=TOKEN, civitai_api_token=TOKEN))


# ----- a compiled transformer -----------------------------------------------------------------------------------------

def test_lora_changes_reach_a_compiled_transformer_without_recompiling(tmp_path):
    """Weights change in place (same tensors, shapes, dtypes, flags): torch.compile sees every LoRA and scale with
    the graph it compiled first. The eager backend keeps this quick; dynamo's guards are what decide recompiling."""
    import lora_loader
    from flux.fakes import tiny
    from flux.lora.fuse import Adapter, LoraManager

    transformer = tiny.build_pipeline().transformer.eval()
    manager = LoraManager()
    manager.register("dev", transformer, "transformer")
    a = lora_loader.normalize(loras.write(loras.make_update(transformer, "ALL", seed=1), "diffusers", tmp_path / "a.safetensors"), "a", "a")
    b = lora_loader.normalize(loras.write(loras.make_update(transformer, "FUSED_OK", seed=2), "kohya", tmp_path / "b.safetensors"), "b", "b")
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.0]), return_dict=False)
    compiled = torch.compile(transformer, backend="eager")
    torch._dynamo.reset()

    def both():
        with torch.inference_mode():
            return compiled(**inputs)[0], transformer(**inputs)[0]

    with torch._dynamo.config.patch(error_on_recompile=True):
        base, _ = both()
        for adapters in ([Adapter(a, 1.0)], [Adapter(a, -0.5), Adapter(b, 2.0)], [Adapter(b, 1.0)]):
            manager.use(adapters, ["dev"])
            got, eager = both()
            assert torch.equal(got, eager) and not torch.equal(got, base)
        manager.use([], ["dev"])
        assert torch.equal(both()[0], base)
