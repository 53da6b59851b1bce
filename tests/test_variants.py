"""FLUX variants as data (flux/variants.py): the table read by everything, and FLUX.1-Krea-dev (`model=krea-dev`) as
its proof: a dev fine-tune added as one row, loaded on first use, with every input dev has."""

from __future__ import annotations

import diffusers
import torch

from flux import memory, variants, weights
from flux.fakes import fullsize
from flux.request import SPEC, Request
from tests.helpers import images, loras

KW = dict(megapixels="0.25", num_inference_steps=2, seed=5, output_format="png", disable_safety_checker=True)


def image(predict, **inputs) -> bytes:
    [path] = predict(**{**KW, **inputs})
    return path.read_bytes()


def test_the_table_is_the_one_place_a_variant_is_described():
    assert [v.name for v in variants.VARIANTS.values()] == ["dev", "schnell", "krea-dev", "kontext-dev", "fill-dev"]
    assert variants.BASE.name == "dev" and variants.ON_FIRST_USE == tuple(variants.VARIANTS.values())[1:]
    assert SPEC["model"].choices == variants.NAMES and SPEC["model"].default == variants.BASE.name
    rows = variants.VARIANTS.values()
    assert len({v.setting for v in rows}) == len({v.tiny_seed for v in rows}) == len(rows)  # each its own
    for v in rows:
        assert set(v.pipelines) <= set(variants.TASKS) and all(hasattr(diffusers, c) for c in v.pipelines.values())
        assert set(v.pipelines) == set(variants.TASKS) or v.name == "fill-dev"  # fill-dev: inpainting only
        assert weights.PATTERNS[v.name] == list(v.files) and weights.LAYOUT[v.name] == list(v.layout)
    assert memory.COMPONENTS[:6] == ("dev", "dev-fp8", "schnell", "schnell-fp8", "krea-dev", "krea-dev-fp8")


def test_requests_follow_each_variants_row():
    krea = Request.build(prompt="x", model="krea-dev", num_inference_steps=40, guidance_scale=4.5)
    assert (krea.num_inference_steps, krea.guidance_scale, krea.notes) == (40, 4.5, ())  # like dev: no cap, guidance
    assert krea.transformer == "krea-dev" and Request.build(prompt="x", model="krea-dev", go_fast=True).transformer \
        == "krea-dev-fp8"
    schnell = Request.build(prompt="x", model="schnell", num_inference_steps=40, guidance_scale=4.5)
    assert (schnell.num_inference_steps, schnell.guidance_scale) == (4, 0.0)
    assert any("schnell runs at most 4 steps" in n for n in schnell.notes)


def test_the_memory_plan_places_krea_dev_like_the_other_variants_loaded_on_first_use():
    sizes = fullsize.plan_sizes()
    assert sizes.bytes["krea-dev"] == sizes.bytes["dev"] and sizes.bytes["krea-dev-fp8"] == sizes.bytes["dev-fp8"]
    for gb, where in ((24, (memory.CPU, memory.ON_DEMAND)), (80, (memory.ON_DEMAND, memory.ON_DEMAND)),
                      (141, (memory.GPU, memory.GPU))):
        plan = memory.plan(int(gb * memory.GiB), sizes)
        assert (plan.where("krea-dev"), plan.where("krea-dev-fp8")) == where, gb
        assert "krea-dev" not in [n for n in plan.resident if n not in memory.ON_FIRST_USE]  # not placed by setup


def test_krea_dev_is_its_own_tiny_twin_loaded_on_first_use_sharing_the_encoders(predict, engine):
    dev_image = image(predict)
    krea_image = image(predict, model="krea-dev")
    assert krea_image != dev_image  # another transformer: tests tell the twins apart
    dev, krea = engine.pipeline("dev", "txt2img"), engine.pipeline("krea-dev", "txt2img")
    assert krea.transformer is not dev.transformer
    assert krea.vae is dev.vae and krea.text_encoder is dev.text_encoder and krea.text_encoder_2 is dev.text_encoder_2
    assert krea.transformer.config.guidance_embeds and krea.scheduler.config.use_dynamic_shifting
    assert not all(torch.equal(a, b) for a, b in zip(krea.transformer.parameters(), dev.transformer.parameters()))
    assert image(predict, model="krea-dev") == krea_image  # deterministic, like every variant


def test_krea_dev_takes_every_input_dev_takes(predict, engine, tmp_path):
    plain = image(predict, model="krea-dev")
    # go_fast and the speed modes: its fp8 copy, built on first use
    assert image(predict, model="krea-dev", go_fast=True) != plain
    assert "krea-dev-fp8" in engine.transformers.copies
    assert image(predict, model="krea-dev", speed_mode="Juiced 🔥 (default)", num_inference_steps=6) \
        != image(predict, model="krea-dev", num_inference_steps=6)
    # img2img and inpainting
    source = images.save(images.gradient(256, 256), tmp_path, "in.png")
    mask = images.save(images.box_mask(256, 256, (64, 64, 192, 192)), tmp_path, "mask.png")
    assert image(predict, model="krea-dev", image=source) != image(predict, model="krea-dev", image=source,
                                                                   prompt_strength=0.5)
    assert image(predict, model="krea-dev", image=source, mask=mask)
    # a LoRA, fused into krea-dev's transformer only, and gone after
    transformer = engine.pipeline("krea-dev", "txt2img").transformer
    update = loras.make_update(transformer, "ATTENTION", seed=9, strength=0.5)
    lora = loras.lora_uri(update, "diffusers")
    assert image(predict, model="krea-dev", replicate_weights=lora) != plain
    assert engine.loras.adapters("krea-dev") and not engine.loras.adapters("dev")
    assert image(predict, model="krea-dev") == plain and not engine.loras.adapters("krea-dev")
