"""FLUX.1-Kontext-dev (`model=kontext-dev`: instruction editing, text-to-image without an image) and FLUX.1-Fill-dev
(`model=fill-dev`: inpainting only) as rows of the variant table (flux/variants.py): what validation makes of their
requests, and their images on the tiny twins. Over HTTP: tests/test_server.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import torch

from flux import memory, sizes, speed, variants
from flux.engine import guidance
from flux.engine.run import pipeline_inputs
from flux.errors import UserError
from flux.prediction import Trace
from flux.fakes import fullsize
from flux.request import SPEC, Request
from tests.helpers import images, loras

KW = dict(megapixels="0.25", num_inference_steps=2, seed=5, output_format="png", disable_safety_checker=True)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit-fill")
    return (images.save(images.gradient(480, 320), folder, "in.png"),
            images.save(images.box_mask(480, 320, (96, 64, 288, 224)), folder, "mask.png"))


def test_each_variants_defaults_stand_for_the_schemas_and_only_there(pictures):
    source, mask = pictures
    fill = Request.build(prompt="x", model="fill-dev", image=source, mask=mask)
    assert (fill.guidance_scale, fill.prompt_strength, fill.task) == (30, 1.0, "inpaint")
    assert any("guidance_scale 30: fill-dev's default" in n for n in fill.notes)
    chosen = Request.build(prompt="x", model="fill-dev", image=source, mask=mask, guidance_scale=50, prompt_strength=.6)
    assert (chosen.guidance_scale, chosen.prompt_strength) == (50, 0.6)  # a value the caller chose is kept
    kontext = Request.build(prompt="x", model="kontext-dev")
    assert (kontext.guidance_scale, kontext.width, kontext.height) == (2.5, 1024, 1024)
    dev = Request.build(prompt="x", image=source, mask=mask)  # dev's defaults are the schema's
    assert (dev.guidance_scale, dev.prompt_strength, dev.notes) == (SPEC["guidance_scale"].default, 0.8, ())
    with pytest.raises(UserError, match="between 0 and 10 for FLUX.1-dev"):
        Request.build(prompt="x", guidance_scale=30)


@pytest.mark.parametrize("inputs", [dict(), dict(image=0)])
def test_fill_dev_without_a_mask_says_what_to_give(pictures, inputs):
    inputs = {k: pictures[v] for k, v in inputs.items()}
    with pytest.raises(UserError, match="runs with an image and a mask only .* Give an image and a mask, or use model dev"):
        Request.build(prompt="x", model="fill-dev", **inputs)


def test_a_kontext_edit_keeps_the_images_aspect_at_a_kontext_resolution_unless_told_otherwise(pictures):
    source, mask = pictures
    edit = Request.build(prompt="make it night", model="kontext-dev", image=source)
    assert (edit.width, edit.height, edit.image.size) == (1248, 832, (480, 320))  # the pipeline resizes the image
    assert any("prompt_strength means nothing" in n for n in edit.notes)
    assert sizes.kontext_size(480, 320, "0.25") == (624, 416)
    assert edit.pixels == 2 * 1248 * 832  # the image's tokens ride beside the output's
    told = Request.build(prompt="x", model="kontext-dev", image=source, aspect_ratio="16:9", megapixels="0.25")
    assert (told.width, told.height) == sizes.table_size("16:9", "0.25")
    inpaint = Request.build(prompt="x", model="kontext-dev", image=source, mask=mask)
    assert (inpaint.width, inpaint.height, inpaint.prompt_strength) == (480, 320, 1.0)  # for the exact overlay


@pytest.mark.parametrize("mode", [speed.OFF, "Juiced 🔥 (default)"])
def test_the_engines_true_cfg_is_diffusers_own_bit_for_bit(engine, pictures, mode):
    """FluxFillPipeline has no true CFG: the engine's hook (flux/engine/guidance.py) gives it. On a pipeline that has
    its own (dev's inpainting), the hook's output is diffusers' exactly, with and without a step cache."""
    source, mask = pictures
    req = Request.build(prompt="a prune", negative_prompt="blurry", true_cfg_scale=3, image=source, mask=mask,
                        num_inference_steps=6, seed=5, speed_mode=mode)
    copy = engine.copy("dev")

    def generate(ours: bool):
        embeds = engine.runner.encode_prompt(req, 1, Trace())
        kwargs = {**pipeline_inputs(req), "output_type": "latent", "generator": torch.Generator().manual_seed(5)}
        around = None
        if ours:
            kwargs.pop("true_cfg_scale")
            around = guidance.true_cfg(req.true_cfg_scale, guidance.negative_embeds(embeds))
        output, cached = copy.run("inpaint", req.mode, 2, around, **embeds, **kwargs)
        return output.images, cached

    native, native_cached = generate(False)
    attributes = dict(vars(copy.transformer))  # diffusers' own call has made its hook registry (its cache_context)
    ours, ours_cached = generate(True)
    assert torch.equal(native, ours) and native_cached == ours_cached and (native_cached > 0) == (mode != speed.OFF)
    assert vars(copy.transformer) == attributes and not copy.transformer._diffusers_hook.hooks  # the hook is gone


def test_fill_dev_takes_a_negative_prompt_with_two_passes_a_step(predict, engine, pictures):
    source, mask = pictures
    plain = run(predict, model="fill-dev", image=source, mask=mask)
    guided = run(predict, model="fill-dev", image=source, mask=mask, negative_prompt="blur", true_cfg_scale=3)
    assert np.asarray(plain).tobytes() != np.asarray(guided).tobytes()
    assert run(predict, model="fill-dev", image=source, mask=mask) == plain  # nothing stays hooked


def test_the_memory_plan_sizes_fill_devs_wider_input():
    plan_sizes = fullsize.plan_sizes()
    extra = plan_sizes.bytes["fill-dev"] - plan_sizes.bytes["dev"]
    assert extra == 2 * 3072 * (384 - 64)  # x_embedder's weight, bf16: the masked image and the mask
    assert plan_sizes.bytes["kontext-dev"] == plan_sizes.bytes["dev"]
    assert {"kontext-dev", "kontext-dev-fp8", "fill-dev", "fill-dev-fp8"} <= set(memory.COMPONENTS)


def run(predict, **inputs) -> Image.Image:
    [path] = predict(**{**KW, **inputs})
    with Image.open(path) as img:
        return img.copy()


def test_fill_dev_paints_only_the_mask_with_go_fast_and_with_dev_and_fill_loras(predict, engine, pictures):
    source, mask = pictures
    keep = np.asarray(Image.open(mask).convert("L")) == 0
    original = np.asarray(Image.open(source).convert("RGB"))
    plain = run(predict, model="fill-dev", image=source, mask=mask)
    assert plain.size == (480, 320) and engine.pipeline("fill-dev", "inpaint").transformer.config.in_channels == 288
    dev = run(predict, image=source, mask=mask)
    assert not np.array_equal(np.asarray(plain), np.asarray(dev))  # its own transformer
    dev_lora = loras.lora_uri(loras.make_update(engine.pipeline("dev", "txt2img").transformer, "ALL", seed=3,
                                                strength=0.5))  # x_embedder 16 -> 3072: fill-dev's is 288 wide
    fill_lora = loras.lora_uri(loras.make_update(engine.pipeline("fill-dev", "inpaint").transformer, "ALL", seed=4,
                                                 strength=0.5))
    outputs = [plain, run(predict, model="fill-dev", image=source, mask=mask, go_fast=True),
               run(predict, model="fill-dev", image=source, mask=mask, replicate_weights=dev_lora),
               run(predict, model="fill-dev", image=source, mask=mask, replicate_weights=fill_lora, go_fast=True)]
    for out in outputs:
        pixels = np.asarray(out)
        assert np.array_equal(pixels[keep], original[keep])  # outside the mask: the input, bit for bit
    assert len({np.asarray(o)[~keep].tobytes() for o in outputs}) == 4  # inside: each request its own
    assert np.array_equal(np.asarray(run(predict, model="fill-dev", image=source, mask=mask)), np.asarray(plain))
    assert not engine.loras.adapters("fill-dev")  # no LoRA stays fused


def test_kontext_dev_edits_with_the_image_and_differs_from_dev(predict, pictures):
    source, mask = pictures
    text = run(predict, model="kontext-dev")
    assert text.size == (512, 512) and text != run(predict)
    edit = run(predict, model="kontext-dev", image=source)
    assert edit.size == (624, 416) and edit != run(predict, model="kontext-dev", image=source, seed=6)
    other = images.save(images.gradient(480, 320, seed=1), source.parent, "other.png")
    assert edit != run(predict, model="kontext-dev", image=other)  # the image conditions it
    inpaint = np.asarray(run(predict, model="kontext-dev", image=source, mask=mask))
    keep = np.asarray(Image.open(mask).convert("L")) == 0
    assert np.array_equal(inpaint[keep], np.asarray(Image.open(source).convert("RGB"))[keep])


def test_every_variant_has_its_tiny_twin():
    assert len({v.tiny_seed for v in variants.VARIANTS.values()}) == len(variants.VARIANTS)
    assert variants.get("fill-dev").in_channels(64) == 384 and variants.get("kontext-dev").in_channels(64) == 64
