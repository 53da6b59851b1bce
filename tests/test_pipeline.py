"""The whole predictor on the tiny FLUX: predict() in, files out, through the real diffusers pipelines."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from flux import variants
from flux.errors import UserError
from tests.helpers import images
from tests.helpers.inputs import first_task, for_variant
from tests.test_sizes import TABLE_1MP

FAST = dict(num_inference_steps=1)


def sizes_of(paths):
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.size)
    return out


@pytest.mark.parametrize("megapixels", ["1", "0.25"])
@pytest.mark.parametrize("aspect_ratio", list(TABLE_1MP))
def test_every_aspect_ratio_and_megapixels(predict, aspect_ratio, megapixels):
    w, h = TABLE_1MP[aspect_ratio]
    expected = (w, h) if megapixels == "1" else (w // 2, h // 2)
    paths = predict(aspect_ratio=aspect_ratio, megapixels=megapixels, seed=1, **FAST)
    assert sizes_of(paths) == [expected]


def test_custom_size_is_rounded(predict):
    paths = predict(aspect_ratio="custom", width=1000, height=600, seed=1, **FAST)
    assert sizes_of(paths) == [(1008, 608)]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_num_outputs(predict, n):
    paths = predict(num_outputs=n, megapixels="0.25", aspect_ratio="1:1", seed=3, **FAST)
    assert len(paths) == n and len({p.read_bytes() for p in paths}) == n


def test_outputs_are_batched_through_the_transformer(predict, engine):
    """num_outputs=4 goes through the transformer as one batch of 4 at every step, not a Python loop."""
    batches = []
    layer = engine.pipeline("dev", "txt2img").transformer.x_embedder
    handle = layer.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        predict(num_outputs=4, megapixels="0.25", seed=3, **FAST)
    finally:
        handle.remove()
    assert batches == [4] * FAST["num_inference_steps"]


def test_same_seed_same_bytes_other_seed_differs(predict):
    kwargs = dict(megapixels="0.25", num_inference_steps=2)
    a = [p.read_bytes() for p in predict(seed=42, **kwargs)]
    b = [p.read_bytes() for p in predict(seed=42, **kwargs)]
    c = [p.read_bytes() for p in predict(seed=43, **kwargs)]
    assert a == b
    assert a != c


def test_output_i_reproduces_alone_with_seed_plus_i(predict):
    kwargs = dict(megapixels="0.25", num_inference_steps=2, output_format="png")
    a = np.asarray(Image.open(predict(seed=10, num_outputs=3, **kwargs)[2]), dtype=np.int16)
    b = np.asarray(Image.open(predict(seed=12, num_outputs=1, **kwargs)[0]), dtype=np.int16)
    assert np.abs(a - b).max() <= 2  # identical up to batch numerics


@pytest.mark.parametrize("fmt,pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_output_formats(predict, fmt, pil_format):
    [path] = predict(output_format=fmt, megapixels="0.25", seed=5, **FAST)
    assert path.suffix == f".{fmt}"
    with Image.open(path) as img:
        assert img.format == pil_format


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_output_quality_changes_lossy_files(predict, fmt):
    low = predict(output_format=fmt, output_quality=5, megapixels="0.25", seed=5, **FAST)[0].stat().st_size
    high = predict(output_format=fmt, output_quality=100, megapixels="0.25", seed=5, **FAST)[0].stat().st_size
    assert high > 2 * low


def test_png_ignores_quality(predict):
    a = predict(output_format="png", output_quality=5, megapixels="0.25", seed=5, **FAST)[0].read_bytes()
    b = predict(output_format="png", output_quality=100, megapixels="0.25", seed=5, **FAST)[0].read_bytes()
    assert a == b


@pytest.mark.parametrize("given,expected", [((2000, 1000), (1440, 720)), ((480, 320), (480, 320)), ((320, 240), (336, 256))])
def test_img2img_keeps_the_input_aspect(predict, tmp_path, given, expected):
    src = images.save(images.gradient(*given), tmp_path, "in.png")
    paths = predict(image=src, aspect_ratio="16:9", megapixels="0.25", prompt_strength=1.0, seed=2, **FAST)
    assert sizes_of(paths) == [expected]


def test_img2img_depends_on_the_image(predict, tmp_path):
    a = images.save(images.gradient(512, 512, seed=1), tmp_path, "a.png")
    b = images.save(images.gradient(512, 512, seed=2).rotate(90), tmp_path, "b.png")
    out_a = predict(image=a, prompt_strength=0.5, num_inference_steps=2, seed=2)[0].read_bytes()
    out_b = predict(image=b, prompt_strength=0.5, num_inference_steps=2, seed=2)[0].read_bytes()
    assert out_a != out_b


def test_inpainting_returns_unmasked_pixels_unchanged(predict, tmp_path):
    src_img = images.gradient(512, 384, seed=7)
    box = (128, 96, 320, 288)
    src = images.save(src_img, tmp_path, "in.png")
    mask = images.save(images.box_mask(512, 384, box), tmp_path, "mask.png")
    [out] = predict(image=src, mask=mask, output_format="png", num_inference_steps=2, seed=4)
    result = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    original = np.asarray(src_img, dtype=np.int16)
    keep = np.ones(result.shape[:2], dtype=bool)
    keep[box[1]:box[3], box[0]:box[2]] = False
    assert result.shape == original.shape
    assert np.array_equal(result[keep], original[keep])
    assert np.abs(result[~keep] - original[~keep]).mean() > 5  # the masked box was repainted


def test_mask_of_another_size_is_resized(predict, tmp_path):
    src = images.save(images.gradient(512, 512), tmp_path, "in.png")
    mask = images.save(images.box_mask(128, 128, (0, 0, 64, 64)), tmp_path, "mask.png")
    [out] = predict(image=src, mask=mask, output_format="png", num_inference_steps=2, seed=4)
    result = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    original = np.asarray(images.gradient(512, 512), dtype=np.int16)
    assert np.array_equal(result[300:, 300:], original[300:, 300:])


@pytest.mark.parametrize("variant", variants.ON_FIRST_USE, ids=lambda v: v.name)
def test_a_variant_loads_on_first_use_and_shares_components(predict, engine, variant, tmp_path):
    picture = for_variant(variant, images.save(images.gradient(512, 512), tmp_path, "in.png"),
                          images.save(images.box_mask(512, 512, (0, 0, 256, 256)), tmp_path, "mask.png"))
    [path] = predict(model=variant.name, megapixels="0.25", seed=1, **picture)
    dev, pipe = engine.pipeline("dev", "txt2img"), engine.pipeline(variant.name, first_task(variant))
    assert pipe.transformer is not dev.transformer
    assert pipe.vae is dev.vae and pipe.text_encoder_2 is dev.text_encoder_2
    assert pipe.scheduler.config.use_dynamic_shifting is variant.scheduler["use_dynamic_shifting"]  # its own
    assert sizes_of([path]) == [(512, 512)]


@contextlib.contextmanager
def rigged_checker(engine, concept: torch.Tensor | None = None, threshold: float | None = None):
    """Point the checker's concept 0 at `concept` with `threshold`; disarm the other concepts.

    The real checker runs its real forward pass; only its concept table is changed.
    """
    model = engine.safety.model
    saved = model.concept_embeds.detach().clone(), model.concept_embeds_weights.detach().clone()
    if threshold is not None:
        model.concept_embeds_weights.data.fill_(10.0)  # cos - 10 < 0: never fires
        model.concept_embeds_weights.data[0] = threshold
    if concept is not None:
        model.concept_embeds.data[0] = concept
    try:
        yield
    finally:
        model.concept_embeds.data.copy_(saved[0])
        model.concept_embeds_weights.data.copy_(saved[1])


@contextlib.contextmanager
def rigged_second(engine, confirm):
    """Make the second opinion's classifier head say nsfw for every image (confirm=True), for none (False), or for
    the images on the positive side of a hyperplane (confirm=(direction, offset) on its pooled feature). The real
    ViT runs its real forward pass; only its last linear layer is changed."""
    head = engine.second_safety.model.classifier
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    nsfw = engine.second_safety.nsfw
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        if confirm is True or confirm is False:
            head.bias[nsfw] = 1.0 if confirm else -1.0
        else:
            direction, offset = confirm
            head.weight[nsfw] = direction
            head.bias[nsfw] = offset
    try:
        yield
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])


def second_features(engine, paths):
    """The second opinion's pooled feature of each image (what its classifier head reads)."""
    model, processor = engine.second_safety.model, engine.second_safety.processor
    imgs = [Image.open(p).convert("RGB") for p in paths]
    with torch.inference_mode():
        pixels = processor(imgs, return_tensors="pt").pixel_values
        return model.vit(pixel_values=pixels).last_hidden_state[:, 0, :].clone()


def image_embeds(engine, paths):
    """The checker's CLIP image embedding of each output, as its forward computes it."""
    model, processor = engine.safety.model, engine.safety.processor
    imgs = [Image.open(p).convert("RGB") for p in paths]
    with torch.inference_mode():
        pixels = processor(imgs, return_tensors="pt").pixel_values
        return model.visual_projection(model.vision_model(pixels)[1])


def test_safety_checker_flags_all_fails_with_a_clear_message(predict, engine):
    with rigged_checker(engine, threshold=-2.0), rigged_second(engine, True), \
            pytest.raises(UserError, match="All 2 generated images were flagged"):
        predict(num_outputs=2, megapixels="0.25", seed=1, **FAST)  # cos - (-2) > 0 for every image


def test_safety_checker_drops_only_flagged_images(predict, engine, caplog):
    kwargs = dict(num_outputs=4, megapixels="0.25", seed=11, output_format="png", **FAST)
    unchecked = predict(disable_safety_checker=True, **kwargs)
    unchecked_bytes = [p.read_bytes() for p in unchecked]
    unit = torch.nn.functional.normalize(image_embeds(engine, unchecked), dim=-1)
    concept = unit[0] + unit[1] - unit[2] - unit[3]  # towards outputs 0 and 1, away from 2 and 3
    scores = torch.nn.functional.cosine_similarity(unit, concept[None], dim=-1)
    assert (scores[:2] > 0.002).all() and (scores[2:] < -0.002).all()  # clear of the checker's 3-decimal rounding
    with rigged_checker(engine, concept, threshold=0.0), rigged_second(engine, True), \
            caplog.at_level("INFO", logger="flux"):
        kept = predict(**kwargs)
    assert [p.read_bytes() for p in kept] == unchecked_bytes[2:]
    assert "removed 2 of 4" in caplog.text and "CompVis flagged 2 of 4 outputs" in caplog.text
    with rigged_checker(engine, concept, threshold=0.0):  # and the switch really skips the checker
        assert len(predict(disable_safety_checker=True, **kwargs)) == 4


@pytest.mark.parametrize("first,second,dropped", [
    ("none", "all", []),          # nothing flagged: the second opinion is never asked
    ("two", "none", []),          # CompVis' false positives, cleared by the second opinion
    ("two", "all", [0, 1]),
    ("two", "one", [0]),          # the second opinion confirms one of the two
    ("all", "none", []),
    ("all", "all", [0, 1, 2, 3]),  # every image dropped: the prediction fails
])
def test_an_output_is_dropped_only_when_both_checkers_flag_it(predict, engine, caplog, first, second, dropped):
    kwargs = dict(num_outputs=4, megapixels="0.25", seed=11, output_format="png", **FAST)
    unchecked = predict(disable_safety_checker=True, **kwargs)
    unchecked_bytes = [p.read_bytes() for p in unchecked]
    unit = torch.nn.functional.normalize(image_embeds(engine, unchecked), dim=-1)
    concept = {"none": None, "two": unit[0] + unit[1] - unit[2] - unit[3], "all": None}[first]
    threshold = {"none": 10.0, "two": 0.0, "all": -2.0}[first]
    features = second_features(engine, unchecked)
    apart = features[0] - features[1]  # image 0 on the nsfw side, image 1 on the other
    confirm = {"none": False, "all": True, "one": (apart, -float(apart @ (features[0] + features[1])) / 2)}[second]
    if second == "one":
        margins = features @ confirm[0] + confirm[1]
        assert margins[0] > 0 > margins[1], margins
    asked = []
    with rigged_checker(engine, concept, threshold=threshold), rigged_second(engine, confirm), \
            caplog.at_level("INFO", logger="flux"):
        original = engine.second_safety.flags
        engine.second_safety.flags = lambda imgs: asked.append(len(imgs)) or original(imgs)
        try:
            if len(dropped) == 4:
                with pytest.raises(UserError, match="All 4 generated images were flagged"):
                    predict(**kwargs)
                return
            kept = predict(**kwargs)
        finally:
            del engine.second_safety.flags
    assert [p.read_bytes() for p in kept] == [b for i, b in enumerate(unchecked_bytes) if i not in dropped]
    assert asked == ({"none": [], "two": [2], "all": [4]}[first])


def test_the_second_opinion_can_be_turned_off(weights_dir):
    from flux import weights

    assert weights.sources(False, {"FLUX_SAFETY_SECOND": "off"}).safety_second is None
    assert weights.sources(False, {}).safety_second == "tiny"
    assert weights.sources(True, {}).safety_second == "Falconsai/nsfw_image_detection"


def test_overlong_prompt_is_refused(predict):
    with pytest.raises(UserError, match="reads at most 512"):
        predict(prompt="purple prune " * 2000, **FAST)


def test_previous_outputs_are_cleaned_up(predict):
    first = predict(megapixels="0.25", seed=1, **FAST)
    second = predict(megapixels="0.25", seed=1, **FAST)
    assert not first[0].exists() and second[0].exists()
