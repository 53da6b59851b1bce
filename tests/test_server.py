"""Against the real cog HTTP server on 127.0.0.1: the Replicate HTTP contract end to end."""

from __future__ import annotations

import pytest

from tests.helpers import images
from tests.helpers.http import HubServer
from tests.helpers.server import CogServer, decode_image, file_uri

pytestmark = pytest.mark.server
TOKEN = "hf_SECRET_server_0123456789"


@pytest.fixture(scope="module")
def hub():
    with HubServer() as hub:
        yield hub


@pytest.fixture(scope="module")
def server(tmp_path_factory, weights_dir, hub):
    log = tmp_path_factory.mktemp("server") / "cog.log"
    env = {"FLUX_WEIGHTS": "tiny", "FLUX_WEIGHTS_DIR": str(weights_dir), "HF_ENDPOINT": hub.base}
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
    ({"guidance_scale": 10.5}, "guidance_scale"),
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
    from flux import tiny
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
