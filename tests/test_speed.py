"""The fast paths on the tiny FLUX: go_fast's fp8 transformer, pruna's speed modes, fused projections, LoRAs on fp8,
compilation without recompiles (dynamo's graphs counted), the fallback to eager, the settings.

The H100 code path (dynamic per-row float8 compiled by inductor) runs in tests/test_h100_path.py."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from flux import compiler, speed, variants, weights
from flux.engine import Engine
from flux.request import Request
from flux.errors import SettingsError
from flux.settings import Settings
from flux.speed import fp8 as fp8_, projections
from tests.helpers import images, loras
from tests.helpers.inputs import for_variant

STEPS = 6
FIRST = variants.ON_FIRST_USE[0]  # a variant loaded on first use, from the table


def render(engine, **inputs) -> np.ndarray:
    req = Request.build(**{"prompt": "a knitted purple prune", "seed": 7, "num_inference_steps": STEPS,
                           "megapixels": "0.25", **inputs})
    return np.stack([np.asarray(img, dtype=np.float32) for img in engine.generate(req).images])


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t  # fp8 compared bit for bit


def fp8_weights(engine) -> list[torch.Tensor]:
    return fp8_weights_of(engine.copy("dev-fp8").transformer)


def fp8_weights_of(transformer) -> list[torch.Tensor]:
    return [raw(t).clone() for m in transformer.modules()
            if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "qdata") for t in (m.weight.qdata, m.weight.scale)]


def quantized(linear: torch.nn.Linear, kind: str):
    """A fresh torchao quantization of a bf16 layer's weight, with the config pruna uses."""
    from torchao.quantization import quantize_

    fresh = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
    fresh.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    with fp8_.hardware_check_skipped(kind == "fp8dqrow" and not torch.cuda.is_available()):
        quantize_(fresh, fp8_.quant_config(kind))
    return fresh.weight


@contextmanager
def block_calls(transformer):
    """Counts the times the first double-stream block really computes (FORA's cached steps do not reach it)."""
    calls = [0]
    handle = transformer.transformer_blocks[0].norm1.register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def build_engine(settings: Settings) -> Engine:
    """Another engine on the tiny weights, with these settings (no safety checker). dynamo's graphs of earlier
    engines are dropped first: every engine of a process shares the blocks' code objects."""
    from diffusers import FluxPipeline

    torch._dynamo.reset()
    sources = weights.sources(has_cuda=False)
    dtype = settings.dtype_on_cpu
    pipe = FluxPipeline.from_pretrained(weights.locate(sources.base, "dev"), dtype=dtype)
    return Engine(pipe, None, sources.variants, torch.device("cpu"), dtype, settings, compile_bundle=None)


# ----- requests ------------------------------------------------------------------------------------------------


def test_speed_modes_cache_more_steps_as_they_rise():
    steps = [m.computed_steps(28) for m in speed.SPEED_MODES]
    assert steps[0] == 28 and steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps), steps


def test_fp8_is_chosen_by_go_fast_and_fastest_modes_at_every_size_and_for_every_variant(tmp_path):
    image = images.save(images.gradient(256, 256), tmp_path, "in.png")
    mask = images.save(images.box_mask(256, 256, (0, 0, 128, 128)), tmp_path, "mask.png")
    assert Request.build(prompt="x", go_fast=True).transformer == "dev-fp8"
    assert Request.build(prompt="x").transformer == "dev"
    assert Request.build(prompt="x", speed_mode="Blink of an eye 👁️").transformer == "dev-fp8"
    assert Request.build(prompt="x", speed_mode="Juiced 🔥 (default)").transformer == "dev"
    assert Request.build(prompt="x", go_fast=True, aspect_ratio="custom", width=512, height=768).transformer == "dev-fp8"
    for v in variants.ON_FIRST_USE:
        picture = for_variant(v, image, mask)
        fast = Request.build(prompt="x", go_fast=True, model=v.name, **picture)
        assert fast.transformer == v.fp8 and any(f"fp8 {v.name} transformer" in n for n in fast.notes)
        assert Request.build(prompt="x", model=v.name, speed_mode="Extra Juiced 🔥 (more speed)",
                             **picture).transformer == v.fp8
        assert Request.build(prompt="x", model=v.name, **picture).transformer == v.name


# ----- settings --------------------------------------------------------------------------------------------------


def test_settings_read_once_and_unknown_values_name_the_setting(tmp_path):
    cpu = torch.device("cpu")
    default = Settings.from_env(cpu, tmp_path, {})
    assert (default.compile, default.fp8, default.fp8_forced, default.attention) == (None, "fp8wo", False, "sdpa")
    assert default.fused_projections and default.channels_last and not default.warmup and default.cache_dir is None
    h100_path = Settings.from_env(cpu, tmp_path, {"FLUX_FP8": "fp8dqrow", "FLUX_COMPILE": "inductor"})
    assert (h100_path.fp8, h100_path.fp8_forced, h100_path.dtype_on_cpu) == ("fp8dqrow", True, torch.bfloat16)
    assert h100_path.warmup and h100_path.compile_vae and h100_path.cache_dir == tmp_path / "compile-cache"
    assert not h100_path.inductor_tuning  # the tuning flags default on only on a GPU
    switches = Settings.from_env(cpu, tmp_path, {"FLUX_COMPILE": "eager", "FLUX_FUSED_PROJECTIONS": "0",
                                                  "FLUX_COMPILE_VAE": "off", "FLUX_WARMUP": "0"})
    assert (switches.compile, switches.fused_projections, switches.compile_vae, switches.warmup) == ("eager", False,
                                                                                                      False, False)
    for name, value in (("FLUX_FP8", "fp4"), ("FLUX_ATTENTION", "flash2"), ("FLUX_COMPILE", "tensorrt-ish"),
                        ("FLUX_FUSED_PROJECTIONS", "maybe")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(cpu, tmp_path, {name: value})


def test_attention_backends_that_cannot_run_here_are_setup_errors():
    cpu = torch.device("cpu")
    assert speed.attention_backend("sdpa", cpu) == "native"
    for name in ("cudnn", "fa3"):
        with pytest.raises(SettingsError, match=f"FLUX_ATTENTION={name} needs an NVIDIA GPU"):
            speed.attention_backend(name, cpu)


# ----- the session engine (eager, as the CPU runs by default) ----------------------------------------------------


def test_go_fast_runs_an_fp8_copy_sharing_encoders_and_vae(engine):
    bf16, fp8 = engine.pipeline("dev", "txt2img"), engine.copy("dev-fp8").models["txt2img"].model
    assert fp8.transformer is not bf16.transformer
    assert all(getattr(fp8, c) is getattr(bf16, c) for c in ("text_encoder", "text_encoder_2", "vae", "scheduler"))
    attn, twin = bf16.transformer.transformer_blocks[0].attn, fp8.transformer.transformer_blocks[0].attn
    assert type(twin.to_qkv.weight).__name__ == "Float8Tensor" and not hasattr(twin, "to_q")  # fused, quantized
    assert type(attn.to_qkv.weight).__name__ != "Float8Tensor"

    base, fast = render(engine), render(engine, go_fast=True)
    assert 0 < mad(base, fast) < 8, mad(base, fast)  # fp8 rounding: close to bf16, not identical
    assert np.array_equal(render(engine, go_fast=True), fast)  # deterministic
    assert np.array_equal(render(engine), base)  # the bf16 path is untouched by the fp8 one


@pytest.mark.parametrize("mode", speed.SPEED_MODES[1:], ids=lambda m: m.name.split()[0])
def test_speed_modes_skip_transformer_steps_and_stay_close(engine, mode):
    steps = 12
    base = render(engine, num_inference_steps=steps)
    transformer = engine.copy("dev-fp8" if mode.fp8 else "dev").transformer
    with block_calls(transformer) as calls:
        fast = render(engine, speed_mode=mode.name, num_inference_steps=steps)
        assert calls[0] == mode.computed_steps(steps) < steps
        assert 0 < mad(base, fast) < 20, mad(base, fast)
        calls[0] = 0
        again = render(engine, speed_mode=mode.name, num_inference_steps=steps)  # FORA resets per request
        assert np.array_equal(again, fast) and calls[0] == mode.computed_steps(steps)
    with block_calls(engine.copy("dev").transformer) as calls:  # Off: every step computes, as before
        assert np.array_equal(render(engine, num_inference_steps=steps), base) and calls[0] == steps


# ----- true classifier-free guidance ------------------------------------------------------------------------------


def test_true_cfg_off_unless_both_a_negative_prompt_and_a_scale_over_1(engine):
    base = render(engine)
    for inputs, note in (({"negative_prompt": "blurry"}, "used only with true_cfg_scale above 1"),
                         ({"true_cfg_scale": 3.0}, "needs a negative_prompt"), ({"negative_prompt": "  "}, None)):
        req = Request.build(prompt="x", **inputs)
        assert not req.true_cfg and (note is None or any(note in n for n in req.notes)), req.notes
        assert np.array_equal(render(engine, **inputs), base)  # bit-identical to a request without them
    assert Request.build(prompt="x", negative_prompt="blurry", true_cfg_scale=1.5).true_cfg


@pytest.mark.parametrize("mode", [speed.SPEED_MODES[0], speed.SPEED_MODES[2], speed.SPEED_MODES[4]],
                         ids=lambda m: m.name.split()[0])
def test_true_cfg_runs_two_passes_per_computed_step_and_fora_counts_steps(engine, mode):
    """FORA's schedule counts denoising steps, not transformer calls: with true CFG each computed step is two
    passes (the prompt and the negative prompt, cached apart), each cached step none."""
    steps, cfg = 12, {"negative_prompt": "blurry, low quality", "true_cfg_scale": 3.0}
    transformer = engine.copy("dev-fp8" if mode.fp8 else "dev").transformer
    with block_calls(transformer) as calls:
        plain = render(engine, speed_mode=mode.name, num_inference_steps=steps)
        calls[0] = 0
        guided = render(engine, speed_mode=mode.name, num_inference_steps=steps, **cfg)
        assert calls[0] == 2 * mode.computed_steps(steps)
        assert 0 < mad(plain, guided) and np.isfinite(guided).all()
        req = Request.build(prompt="a knitted purple prune", seed=7, num_inference_steps=steps, megapixels="0.25",
                            speed_mode=mode.name, **cfg)
        assert engine.generate(req).passes == 2 * mode.computed_steps(steps)
    assert np.array_equal(render(engine, speed_mode=mode.name, num_inference_steps=steps, **cfg), guided)


def test_true_cfg_with_go_fast_a_batch_a_lora_img2img_and_inpainting(engine, tmp_path):
    cfg = {"negative_prompt": "blurry", "true_cfg_scale": 2.5}
    src = images.save(images.gradient(320, 256), tmp_path, "in.png")
    mask = images.save(images.box_mask(320, 256, (0, 0, 160, 256)), tmp_path, "mask.png")
    update = loras.make_update(engine.pipeline("dev", "txt2img").transformer, "ATTENTION", seed=8)
    for inputs in ({"go_fast": True, "num_outputs": 2}, {"replicate_weights": loras.lora_uri(update)},
                   {"image": src, "prompt_strength": 0.7}, {"image": src, "mask": mask, "go_fast": True}):
        plain, guided = render(engine, **inputs), render(engine, **inputs, **cfg)
        assert plain.shape == guided.shape and 0 < mad(plain, guided) and np.isfinite(guided).all(), inputs


def test_a_negative_prompt_over_the_t5_window_is_refused(engine):
    from flux.errors import UserError

    req = Request.build(prompt="x", negative_prompt="blur " * 600, true_cfg_scale=2.0)
    with pytest.raises(UserError, match="negative_prompt is .* tokens long; FLUX.1-dev reads at most 512"):
        engine.generate(req)


def test_a_speed_mode_call_that_fails_midway_leaves_no_caching_behind(engine):
    base = render(engine, num_inference_steps=8)
    layer = engine.copy("dev").transformer.transformer_blocks[0].norm1
    seen = [0]

    def fail_at_third_step(*_):
        seen[0] += 1
        if seen[0] == 3:
            raise RuntimeError("fault injected at the third computed step")

    handle = layer.register_forward_pre_hook(fail_at_third_step)
    try:
        with pytest.raises(RuntimeError, match="fault injected"):
            render(engine, speed_mode="Juiced 🔥 (default)", num_inference_steps=8)
    finally:
        handle.remove()
    with block_calls(engine.copy("dev").transformer) as calls:
        assert np.array_equal(render(engine, num_inference_steps=8), base) and calls[0] == 8


def test_speed_mode_applies_to_img2img_and_inpainting(engine, tmp_path):
    from PIL import Image

    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(src)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((256, 256), 255, np.uint8), 128)).save(mask)
    juiced = speed.mode("Juiced 🔥 (default)")
    for extra in ({"image": src}, {"image": src, "mask": mask}):
        with block_calls(engine.copy("dev").transformer) as calls:
            out = render(engine, speed_mode=juiced.name, prompt_strength=1.0, **extra)
        assert out.shape[1:3] == (512, 512) and calls[0] == juiced.computed_steps(STEPS)


def test_a_variant_with_go_fast_runs_its_fp8_copy_built_on_first_use_and_loras_follow_it(engine):
    kw = {"model": FIRST.name, "num_inference_steps": 2}
    bf16 = render(engine, **kw)
    fast = render(engine, go_fast=True, **kw)
    bf16_model, fp8_model = engine.copy(FIRST.name).transformer, engine.copy(FIRST.fp8).transformer
    before = fp8_weights_of(fp8_model)
    assert before  # its linear layers are torchao fp8 tensors (qdata and scale)
    assert fp8_model is not bf16_model and 0 < mad(bf16, fast) < 20
    update = loras.make_update(bf16_model, "ATTENTION", seed=9)
    with_lora = render(engine, go_fast=True, replicate_weights=loras.lora_uri(update), **kw)
    assert mad(with_lora, fast) > 0
    assert np.array_equal(render(engine, go_fast=True, **kw), fast)  # removed: bit-identical
    assert all(torch.equal(a, b) for a, b in zip(before, fp8_weights_of(fp8_model)))
    assert np.array_equal(render(engine, **kw), bf16)  # the bf16 transformer is untouched by its fp8 twin


def test_lora_on_go_fast_is_requantized_and_removed_exactly(engine):
    dev = engine.pipeline("dev", "txt2img")
    update = loras.make_update(dev.transformer, "ALL", seed=11, strength=2)
    before = fp8_weights(engine)
    plain_fast, plain = render(engine, go_fast=True), render(engine)
    with_lora = render(engine, go_fast=True, replicate_weights=loras.lora_uri(update))
    bf16_lora = render(engine, replicate_weights=loras.lora_uri(update))
    # The LoRA shows on fp8 as on bf16: go_fast with it is far closer to bf16 with it than to go_fast without.
    assert mad(with_lora, bf16_lora) < 0.5 * mad(with_lora, plain_fast), (mad(with_lora, bf16_lora),
                                                                        mad(with_lora, plain_fast))
    # The fp8 twins of the LoRA's layers are a fresh quantization of the fused bf16 weights (q, k and v in one).
    live = engine.copy("dev-fp8").transformer
    for name in ("transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_added_qkv",
                 "single_transformer_blocks.0.attn.to_qkv", "single_transformer_blocks.0.proj_mlp"):
        a, b = live.get_submodule(name).weight, quantized(dev.transformer.get_submodule(name), engine.settings.fp8)
        assert torch.equal(raw(a.qdata), raw(b.qdata)) and torch.equal(a.scale, b.scale)
    half = render(engine, go_fast=True, replicate_weights=loras.lora_uri(update), lora_scale=0.5)
    assert 0 < mad(half, plain_fast) < mad(with_lora, plain_fast)
    assert np.array_equal(render(engine, go_fast=True), plain_fast)  # no LoRA again: bit-identical
    assert all(torch.equal(x, y) for x, y in zip(fp8_weights(engine), before))
    assert np.array_equal(render(engine), plain)


# ----- fused projections ------------------------------------------------------------------------------------------


def _storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _projections(transformer) -> list[tuple[torch.nn.Module, str, tuple[str, ...]]]:
    return [(attn, fused, parts) for attn in transformer.modules() if getattr(attn, "fused_projections", False)
            for fused, parts in projections.FUSED.items() if hasattr(attn, fused)]


def test_fused_projections_keep_views_so_loras_fuse_and_restore_exactly(engine):
    """With fused projections (the default) a LoRA fused into to_q, to_k, to_v is in to_qkv bit for bit: the same
    weights an engine without fusion gets; removing it restores every fused weight exactly."""
    unfused = build_engine(Settings(fused_projections=False))
    fused_t, plain_t = engine.pipeline("dev", "txt2img").transformer, unfused.pipeline("dev", "txt2img").transformer
    assert len(_projections(fused_t)) == 1 * 2 + 2 * 1  # tiny: 1 double-stream block (two fused), 2 single-stream
    originals = {name: p.detach().clone() for name, p in fused_t.named_parameters()}
    update = loras.make_update(plain_t, "ALL", seed=5, strength=2)

    def fused_rows_equal(reference):
        for attn, fused, parts in _projections(fused_t):
            rows = torch.cat([reference(attn, part) for part in parts])
            assert torch.equal(getattr(attn, fused).weight, rows)
            assert all(_storage_of(getattr(attn, p).weight) == _storage_of(getattr(attn, fused).weight) for p in parts)

    for scale in (1.0, 0.3):
        reqs = [Request.build(prompt="p", replicate_weights=loras.lora_uri(update), lora_scale=scale)] * 2
        engine.use_loras(reqs[0]), unfused.use_loras(reqs[1])
        names = {id(m): n for n, m in fused_t.named_modules()}
        fused_rows_equal(lambda attn, part: plain_t.get_submodule(f"{names[id(attn)]}.{part}").weight)
    images = [render(e, replicate_weights=loras.lora_uri(update)) for e in (engine, unfused)]
    assert mad(*images) < 0.5  # one matmul instead of three: the same function, rounded alike
    engine.use_loras(Request.build(prompt="p"))
    assert all(torch.equal(p, originals[name]) for name, p in fused_t.named_parameters())


def test_fused_projections_stay_tied_through_a_move(engine):
    import copy

    transformer = copy.deepcopy(engine.pipeline("dev", "txt2img").transformer)  # a scratch copy, fused
    transformer._apply(lambda t: t.clone())  # what .to() does: every parameter gets its own storage
    attn = transformer.transformer_blocks[0].attn
    assert _storage_of(attn.to_q.weight) != _storage_of(attn.to_qkv.weight)
    projections.tie_projections(transformer)
    assert _storage_of(attn.to_q.weight) == _storage_of(attn.to_qkv.weight)
    projections.move(transformer, torch.device("cpu"))
    assert all(_storage_of(getattr(a, p).weight) == _storage_of(getattr(a, f).weight)
               for a, f, parts in _projections(transformer) for p in parts)


# ----- compiled engines --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """An engine compiled with dynamo's eager backend (graphs captured, no code generated: cheap on a CPU)."""
    return build_engine(Settings(compile="eager", compile_vae=True, cache_dir=tmp_path_factory.mktemp("cache")))


def test_one_graph_per_block_kind_and_precision_and_none_for_new_sizes_loras_scales_or_modes(engine, compiled):
    compiled.warm_up([(512, 512, 1), (512, 512, 2)])
    # bf16 and weight-only fp8: batches 1 to 4 and every size share one graph per block kind (flux/compiler.py)
    assert compiled.graphs() == {compiler.DOUBLE: 2, compiler.SINGLE: 2, compiler.VAE_DECODER: 2}
    graphs = compiled.graphs()
    update = loras.make_update(compiled.pipeline("dev", "txt2img").transformer, "ALL", seed=3)
    other = loras.make_update(compiled.pipeline("dev", "txt2img").transformer, "ATTENTION", seed=4)
    requests = [
        {}, {"aspect_ratio": "16:9"}, {"aspect_ratio": "9:21", "num_outputs": 3}, {"go_fast": True},
        {"go_fast": True, "num_outputs": 4}, {"replicate_weights": loras.lora_uri(update)},
        {"replicate_weights": loras.lora_uri(update), "lora_scale": 0.3},
        {"replicate_weights": loras.lora_uri(update), "go_fast": True},
        {"replicate_weights": loras.lora_uri(other), "go_fast": True},
        *({"speed_mode": m.name} for m in speed.SPEED_MODES), {"speed_mode": "Juiced 🔥 (default)", "go_fast": True},
    ]
    for inputs in requests:
        out = render(compiled, **inputs)
        assert compiled.graphs() == graphs, f"recompiled for {inputs}"
        if inputs in ({}, {"go_fast": True}, {"speed_mode": "Juiced 🔥 (default)"}, {"go_fast": True, "num_outputs": 4}):
            assert np.array_equal(out, render(engine, **inputs))  # dynamo (eager backend) changes no number
    # Custom sizes: the transformer blocks compile nothing new. On a CPU torch picks a convolution kernel by the
    # input's size (mkldnn or not), so the VAE decoder may compile for a size range the table does not reach; on a
    # GPU every convolution is cuDNN's.
    for width, height in ((400, 304), (720, 528)):
        for go_fast in (False, True):  # go_fast runs fp8 at custom sizes too
            render(compiled, aspect_ratio="custom", width=width, height=height, go_fast=go_fast)
    # True classifier-free guidance: a second pass per step through the same graphs.
    render(compiled, negative_prompt="blurry", true_cfg_scale=2.0, go_fast=True, num_outputs=2)
    assert {k: n for k, n in compiled.graphs().items() if k != compiler.VAE_DECODER} == {
        k: n for k, n in graphs.items() if k != compiler.VAE_DECODER}


def test_a_compile_failure_on_one_path_falls_back_to_eager_and_never_fails_the_boot(engine, tmp_path, caplog):
    """A backend that fails on every graph holding fp8 weights: the dev-fp8 path goes eager with a loud log line,
    dev stays compiled, the boot succeeds and go_fast gives the eager engine's images."""
    from torch._dynamo import register_backend

    @register_backend(name="flux_test_fails_on_fp8")
    def fails_on_fp8(gm, example_inputs):
        if any(type(t).__name__ == "Float8Tensor" for t in example_inputs):
            raise RuntimeError("fault injected into the fp8 compile")
        return gm.forward

    caplog.set_level("INFO", logger="flux")
    broken = build_engine(Settings(compile="flux_test_fails_on_fp8", cache_dir=tmp_path))
    broken.warm_up([(512, 512, 1)])
    assert "COMPILE FAILED on the dev-fp8 path" in caplog.text and "fault injected into the fp8 compile" in caplog.text
    assert "COMPILE FAILED on the dev path" not in caplog.text
    assert broken.copy("dev").compiled[0].regions and not broken.copy("dev-fp8").compiled[0].regions
    assert np.array_equal(render(broken, go_fast=True), render(engine, go_fast=True))
    assert np.array_equal(render(broken), render(engine))
