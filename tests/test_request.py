"""Request validation: contradictions and out-of-range values are refused with a message saying what to change."""

import pytest

from flux import variants
from flux.errors import UserError
from flux.request import SPEC, Request
from tests.helpers import images


def test_defaults_are_replicates():
    r = Request.build(prompt="p", seed=1)
    assert (r.width, r.height, r.num_outputs, r.num_inference_steps, r.guidance_scale) == (1024, 1024, 1, 28, 3.0)
    assert (r.output_format, r.output_quality, r.prompt_strength, r.model) == ("webp", 80, 0.8, "dev")
    assert r.task == "txt2img" and r.seeds == [1]


def test_random_seed_and_seed_per_output():
    a, b = Request.build(prompt="p"), Request.build(prompt="p")
    assert a.seed != b.seed
    assert Request.build(prompt="p", seed=7, num_outputs=4).seeds == [7, 8, 9, 10]


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="p", aspect_ratio="custom"), "give both width and height"),
    (dict(prompt="p", aspect_ratio="custom", width=512), "give both width and height"),
    (dict(prompt="p", aspect_ratio="7:5"), "aspect_ratio must be one of"),
    (dict(prompt="p", num_outputs=5), "num_outputs must be between 1 and 4"),
    (dict(prompt="p", num_inference_steps=0), "between 1 and 50"),
    (dict(prompt="p", guidance_scale=10.5), "between 0 and 10"),
    (dict(prompt="p", output_format="gif"), "output_format must be one of"),
    (dict(prompt="p", megapixels="2"), "megapixels must be one of"),
    (dict(prompt="p", seed=2**63), "seed must be between"),
    (dict(prompt="p", lora_scale=3.5), "lora_scale must be between -1 and 3"),
    (dict(prompt="p", extra_lora_scale=-2), "extra_lora_scale must be between -1 and 3"),
])
def test_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        Request.build(**kwargs)


def test_mask_without_image(tmp_path):
    mask = images.save(images.box_mask(512, 512, (0, 0, 64, 64)), tmp_path, "m.png")
    with pytest.raises(UserError, match="mask was given without image"):
        Request.build(prompt="p", mask=mask)


def test_img2img_with_no_denoising_step(tmp_path):
    img = images.save(images.gradient(512, 512), tmp_path, "i.png")
    with pytest.raises(UserError, match="leaves no denoising step"):
        Request.build(prompt="p", image=img, prompt_strength=0.2, num_inference_steps=4)
    assert Request.build(prompt="p", image=img, prompt_strength=0.25, num_inference_steps=4).task == "img2img"


def test_a_step_capped_variant_without_guidance_clamps_steps_and_guidance_with_a_note():
    capped = next(v for v in variants.VARIANTS.values() if v.max_steps and not v.guidance)
    r = Request.build(prompt="p", model=capped.name, num_inference_steps=28, guidance_scale=3.5)
    assert r.num_inference_steps == capped.max_steps < 28 and r.guidance_scale == 0
    assert any(f"at most {capped.max_steps} steps" in n for n in r.notes) and any("no guidance" in n for n in r.notes)


def test_width_without_custom_is_ignored_with_a_note():
    r = Request.build(prompt="p", aspect_ratio="16:9", width=512, height=512)
    assert (r.width, r.height) == (1344, 768)
    assert any("only when aspect_ratio is custom" in n for n in r.notes)


def test_custom_size_rounded_with_a_note():
    r = Request.build(prompt="p", aspect_ratio="custom", width=1000, height=600)
    assert (r.width, r.height) == (1008, 608)
    assert any("rounded to 1008x608" in n for n in r.notes)


def test_image_sets_size_and_mask_follows(tmp_path):
    img = images.save(images.gradient(2000, 1000), tmp_path, "i.png")
    mask = images.save(images.box_mask(500, 250, (0, 0, 100, 100)), tmp_path, "m.png")
    r = Request.build(prompt="p", image=img, mask=mask, aspect_ratio="16:9", megapixels="0.25")
    assert (r.width, r.height) == (1440, 720) and r.image.size == (1440, 720) and r.mask.size == (1440, 720)
    assert r.task == "inpaint"
    assert any("aspect_ratio, megapixels ignored" in n for n in r.notes)


def test_spec_bounds_cover_every_numeric_input():
    for name in ("num_outputs", "num_inference_steps", "guidance_scale", "prompt_strength", "output_quality"):
        assert SPEC[name].ge is not None and SPEC[name].le is not None


@pytest.mark.parametrize("kwargs,loras", [
    (dict(), ()),
    (dict(replicate_weights=" a/b ", lora_scale=0.5), (("a/b", 0.5),)),
    (dict(replicate_weights="a/b", extra_lora="c/d", extra_lora_scale=2), (("a/b", 1.0), ("c/d", 2.0))),
    (dict(extra_lora="c/d", extra_lora_scale=0.3), (("c/d", 0.3),)),  # alone, the extra LoRA is the main one
    (dict(replicate_weights="a/b", lora_scale=0.25, extra_lora="a/b", extra_lora_scale=0.5), (("a/b", 0.75),)),
    (dict(replicate_weights="", extra_lora="  "), ()),
])
def test_loras(kwargs, loras):
    assert Request.build(prompt="p", **kwargs).loras == loras


def test_tokens_stay_out_of_the_repr():
    r = Request.build(prompt="p", hf_api_token="hf_SECRET", civitai_api_token="cv_SECRET")
    assert r.hf_api_token == "hf_SECRET" and "SECRET" not in repr(r)
