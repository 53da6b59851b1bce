"""Against the real cog HTTP server on 127.0.0.1: the Replicate HTTP contract end to end."""

from __future__ import annotations

import pytest

from flux import variants
from tests.helpers import images, loras
from tests.helpers.fault_predictor import NSFW_MARK
from tests.helpers.http import HubServer
from tests.helpers.server import CogServer, client_progress, decode_image, file_uri

pytestmark = pytest.mark.server
TOKEN = "hf_SECRET_server_0123456789"
FAULTS = "tests/helpers/fault_predictor.py:FaultPredictor"
CAPPED = next(v for v in variants.ON_FIRST_USE if v.max_steps)  # a variant with a step cap, from the table


@pytest.fixture(scope="module")
def hub():
    with HubServer() as hub:
        yield hub


@pytest.fixture(scope="module")
def server(tmp_path_factory, weights_dir, hub):
    log = tmp_path_factory.mktemp("server") / "cog.log"
    # The production predictor; its safety checker also flags the second output when a prompt holds NSFW_MARK.
    env = {"FLUX_WEIGHTS": "tiny", "FLUX_WEIGHTS_DIR": str(weights_dir), "HF_ENDPOINT": hub.base,
           "COG_PREDICT_TYPE_STUB": FAULTS, "FLUX_TEST_FAULT": "nsfw-marked"}
    with CogServer(log, env=env) as srv:
        srv.wait_status()
        yield srv


def test_health_and_openapi(server):
    status, health = server.get("/health-check")
    assert status == 200 and health["status"] == "READY"
    status, schema = server.get("/openapi.json")
    assert status == 200 and "prompt" in schema["components"]["schemas"]["Input"]["properties"]


def test_img2img_round_trip_with_data_uris(server, tmp_path):
    src = images.save(images.gradient(480, 320), tmp_path, "in.png")
    status, body = server.predict({
        "prompt": "a knitted purple prune", "image": file_uri(src), "num_inference_steps": 2,
        "prompt_strength": 1.0, "seed": 9, "num_outputs": 2, "output_format": "png",
    })
    assert status == 200, body
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 2
    outs = [decode_image(uri) for uri in body["output"]]
    assert [(o.format, o.size) for o in outs] == [("PNG", (480, 320))] * 2
    assert "Using seed: 9" in body["logs"]


def test_same_seed_same_output_over_http(server):
    inputs = {"prompt": "p", "megapixels": "0.25", "num_inference_steps": 2, "seed": 77}
    a = server.predict(inputs)[1]["output"]
    b = server.predict(inputs)[1]["output"]
    assert a == b


@pytest.mark.parametrize("inputs,field", [
    ({"num_outputs": 5}, "num_outputs"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 51}, "num_inference_steps"),
    ({"guidance_scale": 100.5}, "guidance_scale"),
    ({"prompt_strength": 1.5}, "prompt_strength"),
    ({"output_quality": 101}, "output_quality"),
    ({"width": 100, "aspect_ratio": "custom"}, "width"),
    ({"height": 2000, "aspect_ratio": "custom"}, "height"),
    ({"aspect_ratio": "7:5"}, "aspect_ratio"),
    ({"megapixels": "2"}, "megapixels"),
    ({"output_format": "gif"}, "output_format"),
    ({"model": "pro"}, "model"),
    ({"num_outputs": "two"}, "num_outputs"),
    ({"disable_safety_checker": "maybe"}, "disable_safety_checker"),
    ({"lora_scale": 3.5}, "lora_scale"),
    ({"extra_lora_scale": -1.5}, "extra_lora_scale"),
])
def test_out_of_bounds_and_wrong_types_are_422(server, inputs, field):
    status, body = server.predict({"prompt": "p", **inputs})
    assert status == 422, body
    assert any(field in detail["loc"] for detail in body["detail"]), body


def test_missing_prompt_is_422(server):
    status, body = server.predict({"num_outputs": 1})
    assert status == 422
    assert any("prompt" in detail["loc"] for detail in body["detail"])


def test_engine_error_fails_readably_and_server_stays_ready(server, tmp_path):
    bogus = tmp_path / "bogus.png"
    bogus.write_text("this is not a picture")
    status, body = server.predict({"prompt": "p", "image": file_uri(bogus)})
    assert status == 200 and body["status"] == "failed"
    assert "not an image file" in body["error"] and "Traceback" not in body["error"]
    assert server.wait_status(("READY",), timeout=30)["status"] == "READY"  # coglet frees its slot just after answering
    status, body = server.predict({"prompt": "p", "megapixels": "0.25", "num_inference_steps": 1, "seed": 1})
    assert body["status"] == "succeeded"


def test_contradictory_inputs_fail_with_what_to_change(server):
    status, body = server.predict({"prompt": "p", "aspect_ratio": "custom"})
    assert body["status"] == "failed" and "give both width and height" in body["error"]


def test_lora_from_a_gated_repo_with_a_secret_token(server, hub):
    from flux.fakes import tiny
    from tests.helpers import loras

    update = loras.make_update(tiny.build_pipeline().transformer, "ATTENTION")
    hub.add_repo("me/gated-style", {"style.safetensors": loras.lora_bytes(update, "kohya")}, gated_token=TOKEN)
    inputs = {"prompt": "p", "megapixels": "0.25", "num_inference_steps": 1, "seed": 3, "disable_safety_checker": True}

    def predict(extra):
        return server.predict({**inputs, **extra})

    plain = predict({})[1]["output"]
    status, body = predict({"replicate_weights": "huggingface.co/me/gated-style", "hf_api_token": TOKEN})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    assert body["output"] != plain and "lora:" in body["logs"] and TOKEN not in body["logs"]
    status, body = predict({"replicate_weights": "huggingface.co/me/gated-style"})
    assert body["status"] == "failed" and "pass hf_api_token" in body["error"]  # no token, no LoRA: even cached
    assert predict({})[1]["output"] == plain


# ----- what callers see: progress, metrics, errors ------------------------------------------------------------------

SMALL = {"prompt": "a knitted purple prune", "megapixels": "0.25", "num_inference_steps": 3, "seed": 5}


def succeeded(server, inputs: dict) -> dict:
    status, body = server.predict(inputs)
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    return body


def progress_lines(logs: str) -> list:
    """Each log line that the real replicate client reads as progress, parsed by it."""
    from replicate.prediction import Prediction

    return [p for p in (Prediction.Progress.parse(line) for line in logs.splitlines()) if p is not None]


@pytest.mark.parametrize("inputs,steps", [
    ({"num_outputs": 2}, 3),  # one bar for the whole batch
    ({"num_inference_steps": 8, "prompt_strength": 0.5, "image": "gradient"}, 4),  # img2img runs 8 x 0.5
    ({"num_inference_steps": 6, "speed_mode": "Juiced 🔥 (default)", "go_fast": True}, 6),  # cached steps count too
    ({"model": CAPPED.name, "num_inference_steps": 28}, CAPPED.max_steps),  # it runs at most its cap
], ids=["batch", "img2img", "speed-mode", "step-cap"])
def test_progress_is_one_bar_the_replicate_client_parses_over_the_steps_that_run(server, tmp_path, inputs, steps):
    if inputs.get("image") == "gradient":
        inputs = {**inputs, "image": file_uri(images.save(images.gradient(320, 256), tmp_path, "in.png"))}
    body = succeeded(server, {**SMALL, **inputs})
    bar = progress_lines(body["logs"])
    assert [(p.current, p.total) for p in bar] == [(i, steps) for i in range(1, steps + 1)]
    last = client_progress(body)  # what prediction.progress says
    assert (last.percentage, last.current, last.total) == (1.0, steps, steps)
    assert "\r" not in body["logs"]


def test_metrics_carry_the_facts_of_a_prediction(server):
    from flux import speed

    body = succeeded(server, {**SMALL, "num_outputs": 2, "output_format": "png"})
    m = body["metrics"]
    assert {k: m[k] for k in ("seed", "seeds", "image_count", "nsfw_count", "width", "height", "num_inference_steps",
                              "transformer_passes", "path", "speed_mode")} == {
        "seed": 5, "seeds": [5, 6], "image_count": 2, "nsfw_count": 0, "width": 512, "height": 512,
        "num_inference_steps": 3, "transformer_passes": 3, "path": "dev", "speed_mode": "Off"}
    assert set(m["timing"]) == {"lora", "text_encode", "denoise", "decode", "safety", "encode"}
    assert all(v >= 0 for v in m["timing"].values()) and m["timing"]["denoise"] > 0
    assert m["predict_time"] >= sum(m["timing"].values()) * 0.9 and "lora" not in m

    mode = "Extra Juiced 🔥 (more speed)"  # on the fp8 path
    m = succeeded(server, {**SMALL, "num_inference_steps": 12, "speed_mode": mode})["metrics"]
    assert (m["path"], m["speed_mode"], m["num_inference_steps"]) == ("dev-fp8", mode, 12)
    assert m["transformer_passes"] == speed.mode(mode).computed_steps(12) < 12
    first = variants.ON_FIRST_USE[0]
    m = succeeded(server, {**SMALL, "go_fast": True, "model": first.name, "disable_safety_checker": True})["metrics"]
    assert (m["path"], m["num_inference_steps"], m["transformer_passes"]) == (first.fp8, 3, 3)
    assert "safety" not in m["timing"]  # the checker did not run


def test_true_cfg_over_http_makes_two_passes_per_step_and_says_so(server):
    plain = succeeded(server, {**SMALL, "output_format": "png"})
    ignored = succeeded(server, {**SMALL, "output_format": "png", "negative_prompt": "blurry"})
    assert ignored["output"] == plain["output"] and "used only with true_cfg_scale above 1" in ignored["logs"]
    guided = succeeded(server, {**SMALL, "output_format": "png", "negative_prompt": "blurry", "true_cfg_scale": 2.5})
    assert guided["output"] != plain["output"]
    assert (guided["metrics"]["transformer_passes"], guided["metrics"]["true_cfg"]) == (6, True)
    assert (plain["metrics"]["transformer_passes"], plain["metrics"]["true_cfg"]) == (3, False)


def test_metrics_of_img2img_count_the_steps_that_ran_at_the_image_size(server, tmp_path):
    src = file_uri(images.save(images.gradient(480, 320), tmp_path, "in.png"))
    m = succeeded(server, {**SMALL, "image": src, "num_inference_steps": 10, "prompt_strength": 0.3})["metrics"]
    assert (m["width"], m["height"], m["num_inference_steps"], m["transformer_passes"]) == (480, 320, 3, 3)


def test_metrics_count_what_the_safety_checker_removed(server):
    m = succeeded(server, {**SMALL, "prompt": f"a prune {NSFW_MARK}", "num_outputs": 3, "seed": 20})
    assert len(m["output"]) == 2
    m = m["metrics"]
    assert (m["image_count"], m["nsfw_count"], m["seed"], m["seeds"]) == (2, 1, 20, [20, 22])


def test_metrics_say_whether_a_lora_was_cached_and_never_carry_a_secret(server, hub):
    from flux.fakes import tiny
    from tests.helpers import loras

    update = loras.make_update(tiny.build_pipeline().transformer, "ATTENTION", seed=41)
    url = hub.add("/signed/style.safetensors", loras.lora_bytes(update, "diffusers"))
    secret_url = f"{url}?X-Amz-Signature=SIGNED{TOKEN}"
    inputs = {**SMALL, "replicate_weights": secret_url, "hf_api_token": TOKEN, "lora_scale": 0.8}
    first, again = succeeded(server, inputs)["metrics"], succeeded(server, inputs)["metrics"]
    assert (first["lora_cached"], again["lora_cached"]) == (False, True)
    assert first["lora"] == again["lora"] == [url] and first["timing"]["lora"] > 0
    for m in (first, again):
        assert TOKEN not in repr(m) and "SIGNED" not in repr(m)


def test_a_failure_reads_as_coglets_prefix_then_our_message(server):
    """coglet 0.23.1 writes a failed prediction's error as "Prediction failed: " (its PredictionError) + "Prediction
    failed: " (its predict wrapper) + the exception as pyo3 shows it ("<class name>: <message>"); nothing in the
    predictor can change that prefix (README, "Response")."""
    status, body = server.predict({"prompt": "p", "aspect_ratio": "custom", "width": 512})
    assert status == 200 and body["status"] == "failed"
    assert body["error"] == ("Prediction failed: Prediction failed: UserError: aspect_ratio is custom: give both width "
                             "and height (256 to 1440 pixels).")


def test_kontext_dev_takes_every_input_over_http_and_differs_from_dev(server, tmp_path):
    from flux import speed
    from flux.fakes import tiny

    src = file_uri(images.save(images.gradient(480, 320), tmp_path, "in.png"))
    mask = file_uri(images.save(images.box_mask(480, 320, (96, 64, 288, 224)), tmp_path, "mask.png"))
    lora = loras.lora_uri(loras.make_update(tiny.build_pipeline(variants.get("kontext-dev")).transformer, "ATTENTION",
                                            seed=8, strength=0.5))
    base = {**SMALL, "output_format": "png", "disable_safety_checker": True}
    cases = {"text": {}, "image": {"image": src}, "mask": {"image": src, "mask": mask},
             "lora": {"image": src, "replicate_weights": lora},
             "true cfg": {"image": src, "negative_prompt": "blurry", "true_cfg_scale": 2.5},
             "4 outputs": {"image": src, "num_outputs": 4}, "go_fast": {"image": src, "go_fast": True},
             **{m.name: {"image": src, "speed_mode": m.name, "num_inference_steps": 8}
                for m in speed.SPEED_MODES if m.name != speed.OFF}}
    seen = set()
    for name, inputs in cases.items():
        kontext = succeeded(server, {**base, **inputs, "model": "kontext-dev"})
        dev = succeeded(server, {**base, **inputs})
        assert kontext["output"] != dev["output"], name
        assert kontext["metrics"]["path"].startswith("kontext-dev"), name
        assert len(kontext["output"]) == inputs.get("num_outputs", 1), name
        seen.update(kontext["output"])
    assert len(seen) == len(cases) + 3  # every request its own images
    edit = succeeded(server, {**base, "image": src, "model": "kontext-dev"})
    assert decode_image(edit["output"][0]).size == (624, 416) and "Kontext resolution nearest" in edit["logs"]


def test_fill_dev_over_http_keeps_every_unmasked_pixel(server, tmp_path):
    import numpy as np

    from flux.fakes import tiny

    source = images.gradient(480, 320)
    box = images.box_mask(480, 320, (96, 64, 288, 224))
    keep = np.asarray(box) == 0
    src, mask = (file_uri(images.save(img, tmp_path, name)) for img, name in ((source, "in.png"), (box, "m.png")))
    lora = loras.lora_uri(loras.make_update(tiny.build_pipeline(variants.get("fill-dev")).transformer, "ALL", seed=8,
                                            strength=0.5))
    base = {**SMALL, "output_format": "png", "model": "fill-dev", "image": src, "mask": mask}
    outputs = [succeeded(server, {**base, **more}) for more in ({}, {"go_fast": True}, {"replicate_weights": lora},
                                                                {"negative_prompt": "blurry", "true_cfg_scale": 2.5})]
    for body in outputs:
        pixels = np.asarray(decode_image(body["output"][0]).convert("RGB"))
        assert np.array_equal(pixels[keep], np.asarray(source)[keep])
    assert len({b["output"][0] for b in outputs}) == 4
    assert [b["metrics"]["transformer_passes"] for b in outputs] == [3, 3, 3, 6]  # true CFG: two passes a step
    assert "guidance_scale 30: fill-dev's default" in outputs[0]["logs"]
    status, body = server.predict({**SMALL, "model": "fill-dev", "image": src})
    assert body["status"] == "failed" and "Give an image and a mask" in body["error"]
