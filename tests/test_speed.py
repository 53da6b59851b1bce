"""The fast paths on the tiny FLUX: go_fast's fp8 transformer, pruna's speed modes, LoRAs on fp8, compilation
without recompiles (counted with torch._dynamo's counters), compile caches across boots."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from flux import speed, weights
from flux.engine import Engine
from flux.request import Request
from tests.helpers import loras

STEPS = 6


def render(engine, **inputs) -> np.ndarray:
    req = Request.build(**{"prompt": "a knitted purple prune", "seed": 7, "num_inference_steps": STEPS,
                           "megapixels": "0.25", **inputs})
    return np.stack([np.asarray(img, dtype=np.float32) for img in engine.generate(req).images])


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t  # fp8 compared bit for bit


def fp8_weights(engine) -> list[torch.Tensor]:
    return [raw(t).clone() for m in engine.path("dev-fp8").transformer.modules()
            if isinstance(m, torch.nn.Linear) for t in (m.weight.qdata, m.weight.scale)]


def quantized(linear: torch.nn.Linear, kind: str):
    """A fresh torchao quantization of a bf16 layer's weight, with the config pruna uses."""
    from torchao.quantization import quantize_

    fresh = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
    fresh.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    quantize_(fresh, speed.quant_config(kind))
    return fresh.weight


@contextmanager
def block_calls(transformer):
    """Counts the times the first double-stream block really computes (FORA's cached steps do not reach it)."""
    calls = [0]
    layer = transformer.transformer_blocks[0].attn.to_q
    handle = layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


# ----- requests ------------------------------------------------------------------------------------------------


def test_speed_modes_cache_more_steps_as_they_rise():
    steps = [speed.computed_steps(m, 28) for m in speed.SPEED_MODES]
    assert steps[0] == 28 and steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps), steps


def test_fp8_is_chosen_by_go_fast_and_fastest_modes_except_custom_sizes_and_schnell():
    assert Request.build(prompt="x", go_fast=True).path == "dev-fp8"
    assert Request.build(prompt="x").path == "dev"
    assert Request.build(prompt="x", speed_mode="Blink of an eye 👁️").path == "dev-fp8"
    assert Request.build(prompt="x", speed_mode="Juiced 🔥 (default)").path == "dev"
    custom = Request.build(prompt="x", go_fast=True, aspect_ratio="custom", width=512, height=768)
    assert custom.path == "dev" and any("custom runs bf16" in n for n in custom.notes)
    schnell = Request.build(prompt="x", go_fast=True, model="schnell")
    assert schnell.path == "schnell" and any("schnell runs bf16" in n for n in schnell.notes)


# ----- the session engine (eager, as the CPU runs by default) ----------------------------------------------------


def test_go_fast_runs_an_fp8_copy_sharing_encoders_and_vae(engine):
    bf16, fp8 = engine.pipeline("dev", "txt2img"), engine.path("dev-fp8").models["txt2img"].model
    assert fp8.transformer is not bf16.transformer
    assert all(getattr(fp8, c) is getattr(bf16, c) for c in ("text_encoder", "text_encoder_2", "vae", "scheduler"))
    assert type(fp8.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Float8Tensor"
    assert type(bf16.transformer.transformer_blocks[0].attn.to_q.weight).__name__ != "Float8Tensor"

    base, fast = render(engine), render(engine, go_fast=True)
    assert 0 < mad(base, fast) < 8, mad(base, fast)  # fp8 rounding: close to bf16, not identical
    assert np.array_equal(render(engine, go_fast=True), fast)  # deterministic
    assert np.array_equal(render(engine), base)  # the bf16 path is untouched by the fp8 one


@pytest.mark.parametrize("mode", speed.SPEED_MODES[1:], ids=lambda m: m.name.split()[0])
def test_speed_modes_skip_transformer_steps_and_stay_close(engine, mode):
    steps = 12
    base = render(engine, num_inference_steps=steps)
    transformer = engine.path("dev-fp8" if mode.fp8 else "dev").transformer
    with block_calls(transformer) as calls:
        fast = render(engine, speed_mode=mode.name, num_inference_steps=steps)
        assert calls[0] == speed.computed_steps(mode, steps) < steps
        assert 0 < mad(base, fast) < 20, mad(base, fast)
        calls[0] = 0
        again = render(engine, speed_mode=mode.name, num_inference_steps=steps)  # FORA resets per request
        assert np.array_equal(again, fast) and calls[0] == speed.computed_steps(mode, steps)
    with block_calls(engine.path("dev").transformer) as calls:  # Off: every step computes, as before
        assert np.array_equal(render(engine, num_inference_steps=steps), base) and calls[0] == steps


def test_a_speed_mode_call_that_fails_midway_leaves_no_caching_behind(engine):
    base = render(engine, num_inference_steps=8)
    layer = engine.path("dev").transformer.transformer_blocks[0].attn.to_q
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
    with block_calls(engine.path("dev").transformer) as calls:
        assert np.array_equal(render(engine, num_inference_steps=8), base) and calls[0] == 8


def test_speed_mode_applies_to_img2img_and_inpainting(engine, tmp_path):
    from PIL import Image

    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(src)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((256, 256), 255, np.uint8), 128)).save(mask)
    juiced = speed.mode("Juiced 🔥 (default)")
    for extra in ({"image": src}, {"image": src, "mask": mask}):
        with block_calls(engine.path("dev").transformer) as calls:
            out = render(engine, speed_mode=juiced.name, prompt_strength=1.0, **extra)
        assert out.shape[1:3] == (512, 512) and calls[0] == speed.computed_steps(juiced, STEPS)


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
    # The fp8 twins of the LoRA's layers are a fresh quantization of the fused bf16 weights.
    live = engine.path("dev-fp8").transformer
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"):
        a, b = live.get_submodule(name).weight, quantized(dev.transformer.get_submodule(name), engine.settings.fp8)
        assert torch.equal(raw(a.qdata), raw(b.qdata)) and torch.equal(a.scale, b.scale)
    half = render(engine, go_fast=True, replicate_weights=loras.lora_uri(update), lora_scale=0.5)
    assert 0 < mad(half, plain_fast) < mad(with_lora, plain_fast)
    assert np.array_equal(render(engine, go_fast=True), plain_fast)  # no LoRA again: bit-identical
    assert all(torch.equal(x, y) for x, y in zip(fp8_weights(engine), before))
    assert np.array_equal(render(engine), plain)


# ----- a compiled engine ------------------------------------------------------------------------------------------


@pytest.fixture
def compiled_engine(engine, tmp_path, monkeypatch):
    """A second engine on the tiny weights, its paths compiled with a backend; compile caches under tmp_path."""
    from diffusers import FluxPipeline

    def build(backend: str) -> Engine:
        cache = tmp_path / "cache"
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        monkeypatch.setenv("TRITON_CACHE_DIR", str(cache / "triton"))
        settings = speed.Settings(compile=backend, fp8="fp8wo", warmup=False, cache_dir=cache)
        sources = weights.sources(has_cuda=False)
        pipe = FluxPipeline.from_pretrained(weights.locate(sources.dev, "dev"), dtype=torch.float32)
        return Engine(pipe, None, sources.schnell, torch.device("cpu"), torch.float32, settings)

    return build


def test_compiled_paths_never_recompile_for_sizes_loras_scales_or_modes(engine, compiled_engine):
    counters.clear()
    compiled = compiled_engine("eager")
    shapes = [(512, 512, 1), (512, 512, 2)]
    for name in ("dev", "dev-fp8"):
        speed.warm_up(compiled.path(name), 512, shapes)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    update = loras.make_update(compiled.pipeline("dev", "txt2img").transformer, "ALL", seed=3)
    other = loras.make_update(compiled.pipeline("dev", "txt2img").transformer, "ATTENTION", seed=4)
    requests = [
        {}, {"aspect_ratio": "16:9"}, {"aspect_ratio": "9:21", "num_outputs": 3}, {"go_fast": True},
        {"replicate_weights": loras.lora_uri(update)}, {"replicate_weights": loras.lora_uri(update), "lora_scale": 0.3},
        {"replicate_weights": loras.lora_uri(update), "go_fast": True}, {"replicate_weights": loras.lora_uri(other), "go_fast": True},
        *({"speed_mode": m.name} for m in speed.SPEED_MODES), {"speed_mode": "Juiced 🔥 (default)", "go_fast": True},
        {"aspect_ratio": "custom", "width": 400, "height": 304},
    ]
    for inputs in requests:
        out = render(compiled, **inputs)
        assert counters["stats"]["unique_graphs"] == graphs, f"recompiled for {inputs}"
        if inputs in ({}, {"go_fast": True}, {"speed_mode": "Juiced 🔥 (default)"}):
            assert np.array_equal(out, render(engine, **inputs))  # dynamo (eager backend) changes no number


def test_inductor_compiles_on_cpu_and_a_second_boot_reuses_the_cache(engine, compiled_engine):
    first = compiled_engine("inductor")
    out = render(first)
    assert 0 < mad(out, render(engine)) < 1.0  # inductor's kernels round differently, by little
    first._cache.save()
    assert first._cache.file.is_file()
    second = compiled_engine("inductor")  # a second boot: loads the artifacts the first one saved
    assert second._cache.file == first._cache.file and second._cache.load()
    assert np.array_equal(render(second), out)
