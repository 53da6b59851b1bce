"""The real cog server booted on the public defaults with no secret (FLUX_WEIGHTS=public, FLUX_WEIGHTS_HOST on a
loopback host laid out as Replicate's weights delivery and the safety checkers' Hugging Face repos, serving the tiny
twins): READY, one prediction per model, and no byte of the tars' unread GiB members fetched."""

from __future__ import annotations

from flux import variants
from tests.helpers import images
from tests.helpers.http import HubServer
from tests.helpers.server import CogServer
from tests.helpers.weights_tar import loaded_bytes, serve_public


def test_the_server_boots_on_the_public_defaults_and_serves_every_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("public-boot")
    with HubServer() as hub:
        serve_public(hub, root / "host")
        env = {"FLUX_WEIGHTS": "public", "FLUX_WEIGHTS_HOST": hub.base, "FLUX_WEIGHTS_DIR": str(root / "weights")}
        with CogServer(root / "cog.log", env=env) as server:
            server.wait_status()
            picture = {"image": images.data_uri(images.encoded(images.gradient(256, 256))),
                       "mask": images.data_uri(images.encoded(images.box_mask(256, 256, (0, 0, 99, 99))))}
            for model in variants.NAMES:
                status, body = server.predict({"prompt": "a knitted purple prune", "model": model, "seed": 1,
                                               "megapixels": "0.25", "num_inference_steps": 2,
                                               **({} if "txt2img" in variants.get(model).pipelines else picture)})
                assert status == 200 and body["status"] == "succeeded" and len(body["output"]) == 1, (model, body)
        fetched = sum(int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in hub.ranged_gets()))
        whole_tars = [r.path for r in hub.requests if r.path.endswith(".tar") and "Range" not in r.headers]
    loaded = sum(loaded_bytes(folder) for folder in (root / "weights" / "url").iterdir())  # single files too
    log = (root / "cog.log").read_text()
    assert "USING THE TINY" not in log and "HF_TOKEN" not in log
    assert log.count("not flux1-single-file.safetensors") == 3  # each variant's tar: its unread member skipped
    assert not whole_tars and fetched <= loaded + 2**20, f"{fetched} bytes of the tars fetched for {loaded} loaded"
