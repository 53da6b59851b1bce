"""Hardening, against the real cog HTTP server on 127.0.0.1: bad input, faults, cancellation, webhooks,
idempotency, a soak, and setup failures. docs/reliability.md lists these cases with their results."""

from __future__ import annotations

import io
import shutil
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux.fakes import tiny
from tests.helpers import images
from tests.helpers.images import data_uri as uri
from tests.helpers.images import encoded
from tests.helpers.http import FileServer
from tests.helpers.server import CogServer, WebhookReceiver, client_progress, decode_image, rss_bytes, worker_pid

pytestmark = pytest.mark.server

FAULTS = "tests/helpers/fault_predictor.py:FaultPredictor"
REFERENCE = {"prompt": "a knitted purple prune", "megapixels": "0.25", "num_inference_steps": 2, "seed": 1234,
             "output_format": "png"}


def png(width: int, height: int, seed: int = 0) -> bytes:
    return encoded(images.gradient(width, height, seed))


def bomb_png() -> bytes:
    return encoded(Image.new("1", (20000, 20000)), optimize=True)


@pytest.fixture(scope="module")
def server_env(tmp_path_factory, weights_dir):
    def make(**extra) -> tuple[dict, Path]:
        tmp = tmp_path_factory.mktemp("server-tmp")
        env = {"FLUX_WEIGHTS": "tiny", "FLUX_WEIGHTS_DIR": str(weights_dir), "TMPDIR": str(tmp), **extra}
        return env, tmp

    return make


@pytest.fixture(scope="module")
def server(server_env, tmp_path_factory):
    env, _ = server_env()
    with CogServer(tmp_path_factory.mktemp("log") / "cog.log", env=env) as srv:
        srv.wait_status()
        yield srv


def reference_output(srv: CogServer) -> str:
    status, body = srv.predict(REFERENCE)
    assert body["status"] == "succeeded", body
    return body["output"][0]


@pytest.fixture(scope="module")
def pristine_reference(server_env, tmp_path_factory) -> str:
    """The reference prediction's output from a fresh server (started for it alone, then stopped): what any server
    must give after whatever came before."""
    env, _ = server_env()
    with CogServer(tmp_path_factory.mktemp("fresh") / "cog.log", env=env) as fresh:
        fresh.wait_status()
        return reference_output(fresh)


# ----- bad input: 422 or a failed prediction that says what to change -----------------------------

BAD_422 = [
    ("missing prompt", {"num_outputs": 1}, "prompt"),
    ("prompt not a string", {"prompt": 123}, "prompt"),
    ("num_outputs 0", {"num_outputs": 0}, "num_outputs"),
    ("num_outputs 5", {"num_outputs": 5}, "num_outputs"),
    ("true_cfg_scale 0.5", {"true_cfg_scale": 0.5}, "true_cfg_scale"),
    ("true_cfg_scale 11", {"true_cfg_scale": 11}, "true_cfg_scale"),
    ("steps 0", {"num_inference_steps": 0}, "num_inference_steps"),
    ("steps 51", {"num_inference_steps": 51}, "num_inference_steps"),
    ("guidance -1", {"guidance_scale": -1}, "guidance_scale"),
    ("guidance 101", {"guidance_scale": 101}, "guidance_scale"),
    ("strength -0.1", {"prompt_strength": -0.1}, "prompt_strength"),
    ("strength 1.1", {"prompt_strength": 1.1}, "prompt_strength"),
    ("quality -1", {"output_quality": -1}, "output_quality"),
    ("quality 101", {"output_quality": 101}, "output_quality"),
    ("width 100", {"aspect_ratio": "custom", "width": 100, "height": 512}, "width"),
    ("height 2000", {"aspect_ratio": "custom", "width": 512, "height": 2000}, "height"),
    ("unknown aspect ratio", {"aspect_ratio": "7:5"}, "aspect_ratio"),
    ("unknown megapixels", {"megapixels": "2"}, "megapixels"),
    ("unknown format", {"output_format": "gif"}, "output_format"),
    ("unknown model", {"model": "pro"}, "model"),
    ("num_outputs wrong type", {"num_outputs": "two"}, "num_outputs"),
    ("seed wrong type", {"seed": "abc"}, "seed"),
    ("guidance wrong type", {"guidance_scale": "high"}, "guidance_scale"),
    ("bool wrong type", {"disable_safety_checker": "maybe"}, "disable_safety_checker"),
    ("float for an int", {"num_inference_steps": 2.5}, "num_inference_steps"),
]

IMAGE_REFUSED = "image could not be read: send an uploaded file, a data: URI or an http(s) URL."
BAD_FAILED = [
    ("guidance 11 on dev", lambda: {"guidance_scale": 11}, "between 0 and 10 for FLUX.1-dev"),
    ("not an image", lambda: {"image": uri(b"hello, I am text")}, "not an image file"),
    ("empty file", lambda: {"image": uri(b"")}, "not an image file"),
    ("truncated image", lambda: {"image": uri(png(512, 512)[:3000])}, "truncated or corrupt"),
    ("1x1 image", lambda: {"image": uri(png(1, 1))}, "at least 64"),
    ("20000x20000 header", lambda: {"image": uri(bomb_png())}, "400 MP; the limit is 64 MP"),
    ("aspect too extreme", lambda: {"image": uri(png(2000, 128))}, "crop the image closer to square"),
    ("mask not an image", lambda: {"image": uri(png(512, 512)), "mask": uri(b"GIF89a nonsense")}, "mask is not an image"),
    ("mask without image", lambda: {"mask": uri(png(512, 512))}, "mask was given without image"),
    ("image not a URL", lambda: {"image": "not-a-url"}, "send an uploaded file, a data: URI"),
    ("image a path on the server", lambda: {"image": "/etc/hostname"}, IMAGE_REFUSED),
    ("image a device that never ends", lambda: {"image": "/dev/zero"}, IMAGE_REFUSED),
    ("image the server's stdin", lambda: {"image": "/proc/self/fd/0"}, IMAGE_REFUSED),
    ("mask a path on the server", lambda: {"image": uri(png(512, 512)), "mask": "/etc/hostname"},
     IMAGE_REFUSED.replace("image", "mask")),
    ("custom without size", lambda: {"aspect_ratio": "custom"}, "give both width and height"),
    ("custom without height", lambda: {"aspect_ratio": "custom", "width": 512}, "give both width and height"),
    ("no denoising step", lambda: {"image": uri(png(512, 512)), "prompt_strength": 0.01, "num_inference_steps": 4},
     "raise prompt_strength or num_inference_steps"),
    ("empty prompt", lambda: {"prompt": ""}, "prompt is empty"),
    ("blank prompt", lambda: {"prompt": "   \n  "}, "prompt is empty"),
    ("10,000-character prompt", lambda: {"prompt": "a purple prune, " * 625}, "Shorten the prompt"),
    ("10,000-character negative_prompt", lambda: {"negative_prompt": "blurry, " * 1250, "true_cfg_scale": 2},
     "Shorten the negative_prompt"),
    ("seed out of range", lambda: {"seed": 2**63}, "seed must be between"),
]


def test_bad_input_then_bit_identical_to_a_fresh_server(server, pristine_reference):
    """Every bad request is refused with a clear message; afterwards the server is READY and a valid
    prediction is bit-identical to the same prediction on a fresh server."""
    problems = []
    for name, inputs, field in BAD_422:
        status, body = server.predict({"prompt": "p", **inputs} if "prompt" not in inputs and name != "missing prompt" else inputs)
        if status != 422 or not any(field in d["loc"] for d in body.get("detail", [])):
            problems.append((name, status, body))
    for name, make, message in BAD_FAILED:
        status, body = server.predict({"prompt": "p", "num_inference_steps": 1, **make()})
        error = body.get("error") or ""
        if body.get("status") != "failed" or message not in error or "Traceback" in error:
            problems.append((name, status, {k: str(v)[:300] for k, v in body.items()}))
    status, body = server.request("POST", "/predictions", b"{not json")
    if status not in (400, 422):
        problems.append(("body not JSON", status, body))
    assert not problems, problems
    assert len(BAD_422) + len(BAD_FAILED) + 1 >= 30
    server.wait_status(timeout=10)

    assert reference_output(server) == pristine_reference


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return encoded(images.gradient(640, 320), "JPEG", exif=exif.tobytes(), quality=95)


UNUSUAL_BUT_VALID = [
    ("CMYK JPEG", lambda: encoded(images.gradient(512, 384).convert("CMYK"), "JPEG"), (512, 384)),
    ("16-bit greyscale PNG", lambda: encoded(Image.fromarray(
        (np.asarray(images.gradient(512, 384).convert("L"), dtype=np.uint16) * 257))), (512, 384)),
    ("palette PNG", lambda: encoded(images.gradient(512, 384).convert("P")), (512, 384)),
    ("RGBA PNG", lambda: encoded(images.gradient(512, 384).convert("RGBA")), (512, 384)),
    ("EXIF-rotated JPEG", exif_rotated_jpeg, (320, 640)),
    ("WebP", lambda: encoded(images.gradient(512, 384), "WEBP"), (512, 384)),
]


@pytest.mark.parametrize("name,make,size", UNUSUAL_BUT_VALID, ids=[c[0] for c in UNUSUAL_BUT_VALID])
def test_unusual_images_work(server, name, make, size):
    status, body = server.predict({"prompt": "p", "image": uri(make()), "num_inference_steps": 2, "seed": 1})
    assert body["status"] == "succeeded", body.get("error")
    assert decode_image(body["output"][0]).size == size


def test_mask_of_another_size_works(server):
    status, body = server.predict({
        "prompt": "p", "image": uri(png(512, 384)), "mask": uri(encoded(images.box_mask(100, 75, (0, 0, 50, 50)))),
        "num_inference_steps": 2, "seed": 1, "output_format": "png",
    })
    assert body["status"] == "succeeded", body.get("error")
    assert decode_image(body["output"][0]).size == (512, 384)


# ----- faults ---------------------------------------------------------------------------------------

def test_out_of_memory_fails_cleanly_then_recovers(server_env, tmp_path_factory, pristine_reference):
    env, tmp = server_env(COG_PREDICT_TYPE_STUB=FAULTS, FLUX_TEST_FAULT="oom-once,oom-batch")
    with CogServer(tmp_path_factory.mktemp("oom") / "cog.log", env=env) as srv:
        srv.wait_status()
        status, body = srv.predict(REFERENCE)
        assert body["status"] == "failed" and "Out of GPU memory" in body["error"]
        assert "Traceback" not in body["error"]
        srv.wait_status(timeout=10)
        # A batch that does not fit is generated one output at a time.
        status, body = srv.predict({**REFERENCE, "num_outputs": 4})
        assert body["status"] == "succeeded" and len(body["output"]) == 4
        assert "one at a time" in body["logs"]
        bar = client_progress(body)  # one bar over the four calls; their passes add up
        assert (bar.current, bar.total) == (8, 8) and body["metrics"]["transformer_passes"] == 8
        # And the next prediction is the same as anywhere else.
        status, body = srv.predict(REFERENCE)
        assert body["status"] == "succeeded"
        first = body["output"][0]
    assert not [p for p in tmp.iterdir() if p.name.startswith("flux-out-")][1:]  # at most the last outputs
    assert pristine_reference == first


# ----- cancellation, webhooks, idempotency ------------------------------------------------------------

STEP_SECONDS = 0.6


@pytest.fixture(scope="module")
def slow_server(server_env, tmp_path_factory):
    env, tmp = server_env(COG_PREDICT_TYPE_STUB=FAULTS, FLUX_TEST_FAULT="slow-steps",
                          FLUX_TEST_STEP_SECONDS=str(STEP_SECONDS))
    with CogServer(tmp_path_factory.mktemp("slow") / "cog.log", env=env) as srv:
        srv.wait_status()
        srv.tmp = tmp
        yield srv


def outputs_on_disk(tmp: Path) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name.startswith("flux-out-")]


def test_cancel_lands_within_a_step_and_leaves_nothing(slow_server):
    with WebhookReceiver() as hook:
        status, body = slow_server.request(
            "PUT", "/predictions/cancel-me",
            {"input": {**REFERENCE, "num_inference_steps": 30}, "webhook": hook.hook_url,
             "webhook_events_filter": ["start", "completed"]},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202
        hook.wait_for(lambda e: any(x["status"] == "processing" for x in e))
        time.sleep(3 * STEP_SECONDS)
        before = set(outputs_on_disk(slow_server.tmp))
        started = time.monotonic()
        assert slow_server.request("POST", "/predictions/cancel-me/cancel")[0] == 200
        events = hook.wait_for(lambda e: any(x["status"] == "canceled" for x in e), timeout=30)
        latency = time.monotonic() - started
    # stopped at a step boundary, not after the 27 steps left (16 s); the margin is for a loaded 2-core machine
    assert latency < 5 * STEP_SECONDS, f"cancel took {latency:.2f}s with {STEP_SECONDS}s steps"
    assert [e["status"] for e in events][-1] == "canceled"
    slow_server.wait_status(timeout=10)
    assert set(outputs_on_disk(slow_server.tmp)) <= before  # the cancelled prediction wrote nothing
    status, body = slow_server.predict(REFERENCE)
    assert body["status"] == "succeeded"


def test_client_dropping_a_sync_request_cancels_it(slow_server):
    reference = reference_output(slow_server)
    with pytest.raises(TimeoutError):
        slow_server.predict({**REFERENCE, "num_inference_steps": 40}, timeout=2 * STEP_SECONDS)
    slow_server.wait_status(timeout=STEP_SECONDS + 5)  # back to READY within about a step, not 40 steps
    assert reference_output(slow_server) == reference


TERMINAL = ("succeeded", "failed", "canceled")


def in_order(events: list[dict]) -> list[dict]:
    """Webhooks in the order of what they carry, as the replicate clients order them (delivery order is no promise:
    coglet sends each from its own task, and a busy machine reorders them): a prediction's logs and outputs only
    grow, and its terminal status comes last."""
    return sorted(events, key=lambda e: (e["status"] in TERMINAL, len(e.get("logs") or ""), len(e.get("output") or ())))


def test_progress_advances_while_the_prediction_runs(slow_server):
    """The logs webhooks of a slow prediction, read as the real replicate client reads prediction.progress: the bar
    moves step by step before the prediction completes, and ends full."""
    steps = 6
    with WebhookReceiver() as hook:
        status, _ = slow_server.request(
            "POST", "/predictions",
            {"input": {**REFERENCE, "num_inference_steps": steps, "num_outputs": 2}, "webhook": hook.hook_url,
             "webhook_events_filter": ["logs", "completed"]},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202
        events = in_order(hook.settled(lambda e: any(x["status"] == "succeeded" for x in e)))
    seen = [client_progress(e) for e in events]
    running = [(p.current, p.total) for p, e in zip(seen, events) if p is not None and e["status"] == "processing"]
    assert len(set(running)) >= 3, running  # several distinct points while it ran
    assert all(total == steps for _, total in running) and running[0][0] < steps
    assert [c for c, _ in running] == sorted(c for c, _ in running)  # the logs' order is the progress' order
    final = seen[-1]
    assert events[-1]["status"] == "succeeded" and (final.current, final.total, final.percentage) == (steps, steps, 1.0)


def test_async_webhooks_start_output_logs_completed(slow_server):
    with WebhookReceiver() as hook:
        status, body = slow_server.request(
            "POST", "/predictions",
            {"input": {**REFERENCE, "num_outputs": 2}, "webhook": hook.hook_url,
             "webhook_events_filter": ["start", "output", "logs", "completed"]},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202 and body["status"] in ("starting", "processing")
        events = in_order(hook.settled(lambda e: any(x["status"] == "succeeded" for x in e)))
    statuses = [e["status"] for e in events]
    assert statuses[0] == "processing" and statuses[-1] == "succeeded"
    assert any(e.get("output") for e in events[:-1]), "no output event before completion"
    assert any("Using seed: 1234" in (e.get("logs") or "") for e in events[:-1]), "no logs event before completion"
    assert len(events[-1]["output"]) == 2


def test_put_is_idempotent(slow_server):
    with WebhookReceiver() as hook:
        request = {"input": {**REFERENCE, "num_inference_steps": 4}, "webhook": hook.hook_url,
                   "webhook_events_filter": ["completed"]}
        first = slow_server.request("PUT", "/predictions/same-id", request, headers={"Prefer": "respond-async"})
        second = slow_server.request("PUT", "/predictions/same-id", request, headers={"Prefer": "respond-async"})
        assert first[0] == second[0] == 202
        assert first[1]["id"] == second[1]["id"] == "same-id"
        hook.wait_for(lambda e: any(x["status"] == "succeeded" for x in e))
        time.sleep(2 * STEP_SECONDS)
        completed = [e for e in hook.events if e["id"] == "same-id"]
    assert len(completed) == 1, "the repeated PUT started a second prediction"
    assert completed[0]["logs"].count("Using seed") == 1


# ----- soak -----------------------------------------------------------------------------------------

def test_soak_200_mixed_predictions(server_env, tmp_path_factory, lora_host):
    env, tmp = server_env()
    img, mask = uri(png(384, 256, seed=3)), uri(encoded(images.box_mask(384, 256, (64, 64, 192, 192))))
    kinds = [
        {"prompt": "p", "megapixels": "0.25", "aspect_ratio": "16:9", "go_fast": True},
        {"prompt": "p", "image": img, "prompt_strength": 1.0, "speed_mode": "Juiced 🔥 (default)",
         "num_inference_steps": 4},
        {"prompt": "p", "image": img, "mask": mask, "prompt_strength": 1.0},
        {"prompt": "p", "megapixels": "0.25", "num_outputs": 2, "output_format": "jpg",
         "speed_mode": "Blink of an eye 👁️", "num_inference_steps": 4},
        {"prompt": "p", "megapixels": "0.25", "replicate_weights": lora_host.url("/a.safetensors"), "go_fast": True},
        {"prompt": "p", "megapixels": "0.25", "replicate_weights": lora_host.url("/b.safetensors"), "lora_scale": 0.5,
         "extra_lora": lora_host.url("/a.safetensors"), "extra_lora_scale": -0.5},
        {"prompt": "p", "num_outputs": 9},  # invalid: 422
        {"prompt": "p", "aspect_ratio": "custom"},  # invalid: failed
    ]
    with CogServer(tmp_path_factory.mktemp("soak") / "cog.log", env=env) as srv:
        srv.wait_status()
        results = {"succeeded": 0, "failed": 0, 422: 0}

        def run(i):
            status, body = srv.predict({"num_inference_steps": 1, "seed": i, **kinds[i % len(kinds)]})
            results[422 if status == 422 else body["status"]] += 1

        for i in range(40):  # warm-up: every kind several times
            run(i)
        pid = worker_pid(srv.process.pid)
        rss = []  # after each prediction: one reading swings a few percent with the allocator, a leak moves them all
        for i in range(40, 200):
            run(i)
            rss.append(rss_bytes(pid))
        srv.wait_status(timeout=10)
    assert results == {"succeeded": 150, "failed": 25, 422: 25}, results
    first, last = statistics.median(rss[:40]), statistics.median(rss[-40:])
    assert last / first - 1 < 0.03, f"worker RSS grew {last / first - 1:.1%} (median of 40 predictions) over 120 more"
    loras = Path(env["FLUX_WEIGHTS_DIR"]) / "loras"
    assert not list(loras.glob(".staging-*"))  # no half-built cache entry
    left = [p for p in tmp.rglob("*") if p.is_file()]  # the server's TMPDIR
    assert len(left) <= 2, left  # at most the last prediction's outputs


# ----- setup failures -------------------------------------------------------------------------------

def setup_failure(env: dict, log: Path) -> str:
    with CogServer(log, env=env) as srv:
        health = srv.wait_status(("SETUP_FAILED", "READY"))
    assert health["status"] == "SETUP_FAILED", health["status"]
    return health["setup"]["logs"]


def test_setup_fails_clearly_on_missing_weights(server_env, tmp_path_factory):
    env, _ = server_env(FLUX_WEIGHTS="/nonexistent/FLUX.1-dev")
    logs = setup_failure(env, tmp_path_factory.mktemp("missing") / "cog.log")
    assert "/nonexistent/FLUX.1-dev does not exist" in logs


@pytest.mark.parametrize("setting,value", [("FLUX_FP8", "fp4"), ("FLUX_COMPILE_CACHE", "/nonexistent/compile-bundle")])
def test_setup_fails_clearly_on_a_bad_speed_setting(server_env, tmp_path_factory, setting, value):
    env, _ = server_env(**{setting: value, "FLUX_COMPILE": "eager"})
    logs = setup_failure(env, tmp_path_factory.mktemp("setting") / "cog.log")
    assert f"{setting}=" in logs and "Traceback" not in logs


def test_setup_fails_clearly_on_an_nvidia_driver_too_old_for_the_image(server_env, tmp_path_factory):
    from tests.test_gpu import fake_nvidia_smi

    env, _ = server_env(PATH=fake_nvidia_smi(tmp_path_factory.mktemp("driver"), "535.104.05"))
    logs = setup_failure(env, tmp_path_factory.mktemp("driver-log") / "cog.log")
    assert "needs driver 580 or newer" in logs and "535.104.05" in logs and "Traceback" not in logs


def test_setup_fails_clearly_on_corrupt_weights(server_env, weights_dir, tmp_path_factory):
    from flux.fakes import tiny

    broken = tmp_path_factory.mktemp("corrupt") / "FLUX.1-dev"
    shutil.copytree(tiny.ensure_pipeline(weights_dir / "tiny" / "FLUX.1-dev"), broken)
    shard = next((broken / "transformer").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    env, _ = server_env(FLUX_WEIGHTS=str(broken))
    logs = setup_failure(env, tmp_path_factory.mktemp("corrupt-log") / "cog.log")
    assert "could not be loaded" in logs and "download them again" in logs


def test_setup_refuses_weights_from_a_private_address(server_env, tmp_path_factory):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    with FileServer() as srv:
        env, _ = server_env(FLUX_WEIGHTS=srv.add("/w.tar", buf.getvalue()), FLUX_ALLOW_PRIVATE_URLS="0")
        logs = setup_failure(env, tmp_path_factory.mktemp("private") / "cog.log")
        assert srv.requests == []
    assert "non-public address" in logs


# ----- LoRAs: bad references, faults, cache, cancellation, secrets, hostile URLs ----------------------

SECRET = "hf_TOPSECRET_do_not_log_9f8e7d"


@pytest.fixture(scope="module")
def lora_bytes():
    """Two different tiny LoRAs for the tiny FLUX (attention only), as files."""
    from flux.fakes import tiny
    from tests.helpers import loras

    transformer = tiny.build_pipeline().transformer
    return [loras.lora_bytes(loras.make_update(transformer, "ATTENTION", seed=seed), layout)
            for seed, layout in ((5, "diffusers"), (6, "kohya"))]


@pytest.fixture(scope="module")
def lora_host(lora_bytes):
    import pickle

    from tests.helpers.http import HubServer

    with HubServer() as host:
        host.add("/a.safetensors", lora_bytes[0])
        host.add("/b.safetensors", lora_bytes[1])
        host.add("/weights.bin", pickle.dumps({"weight": [1, 2, 3]}))
        host.add("/pickle.safetensors", pickle.dumps({"lora_A": [1.0] * 64}))
        host.add("/page.safetensors", b"<!doctype html><html><body>Sign in</body></html>", content_type="text/html")
        host.add("/hang.safetensors", lora_bytes[0], hang=8)
        host.add("/reset.safetensors", lora_bytes[0], no_ranges=True, truncate=len(lora_bytes[0]) // 3, reset=True)
        host.add("/extra.safetensors", lora_bytes[0], extra=4096)
        host.add("/slow-start.safetensors", lora_bytes[1], hang=3)
        host.add("/gzip.safetensors", lora_bytes[0], encoding="gzip")
        host.add("/broken-gzip.safetensors", lora_bytes[0], encoding="gzip-broken")
        host.add("/loop.safetensors", b"", redirect=host.url("/loop.safetensors"))
        host.add_repo("someone/private-lora", {"lora.safetensors": lora_bytes[1]}, gated_token=SECRET)
        yield host


def own_weights(tmp_path_factory) -> Path:
    """A weights folder of its own (the tiny FLUX in it), so the LoRA cache under it is one server's alone."""
    from flux.fakes import tiny

    weights = tmp_path_factory.mktemp("own-weights")
    tiny.ensure_pipeline(weights / "tiny" / "FLUX.1-dev")
    tiny.ensure_safety_checker(weights / "tiny" / "safety-checker")
    return weights


@pytest.fixture(scope="module")
def lora_server(server_env, lora_host, lora_bytes, tmp_path_factory):
    weights = own_weights(tmp_path_factory)
    cap_gb = 1.5 * max(map(len, lora_bytes)) / 2**30  # room for one LoRA, not two
    env, tmp = server_env(
        FLUX_WEIGHTS_DIR=str(weights), FLUX_REPLICATE_URL=lora_host.base, HF_ENDPOINT=lora_host.base,
        FLUX_LORA_TIMEOUT_S="3", FLUX_LORA_CACHE_GB=f"{cap_gb:.12f}",
    )
    log = tmp_path_factory.mktemp("lora-log") / "cog.log"
    with CogServer(log, env=env) as srv:
        srv.wait_status()
        srv.tmp, srv.weights, srv.log_path = tmp, weights, log
        yield srv


def cache_files(srv) -> list[Path]:
    root = srv.weights / "loras"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_cache_clean(srv) -> None:
    """Only complete entries: no .part file, no staging folder left behind."""
    for path in cache_files(srv):
        assert path.suffix == ".safetensors" and not any(part.startswith(".") for part in path.relative_to(srv.weights).parts), path


def test_bad_lora_references_fail_clearly(lora_server, lora_host, server):
    cases = [
        ("unparseable", "!!! not a lora", "Cannot read the LoRA reference"),
        ("unknown Replicate model", "nobody/nothing", "not found"),
        ("unknown Hugging Face repo", "huggingface.co/nobody/nothing", "not found"),
        ("not safetensors (.bin)", lora_host.url("/weights.bin"), "pickle"),
        ("pickle renamed .safetensors", lora_host.url("/pickle.safetensors"), "pickle checkpoint"),
        ("HTML page as a LoRA", lora_host.url("/page.safetensors"), "not a safetensors file"),
        ("missing file", lora_host.url("/missing.safetensors"), "not found"),
    ]
    problems = []
    for name, reference, message in cases:
        status, body = lora_server.predict({**REFERENCE, "replicate_weights": reference})
        error = body.get("error") or ""
        if body.get("status") != "failed" or message.lower() not in error.lower() or "Traceback" in error:
            problems.append((name, body.get("status"), error[:300]))
    assert not problems, problems
    assert_cache_clean(lora_server)
    assert not cache_files(lora_server)
    lora_server.wait_status(timeout=10)
    assert reference_output(lora_server) == reference_output(server)


@pytest.mark.parametrize("path,message", [
    ("/hang.safetensors", "stopped sending data"),
    ("/reset.safetensors", "dropping the connection"),
    ("/extra.safetensors", "more bytes than it announced"),
    ("/broken-gzip.safetensors", "does not decode as its Content-Encoding says"),
    ("/loop.safetensors", "redirects too many times"),
])
def test_lora_server_faults_fail_cleanly(lora_server, lora_host, server, path, message):
    status, body = lora_server.predict({**REFERENCE, "replicate_weights": lora_host.url(path)})
    assert body["status"] == "failed" and message in body["error"], body.get("error")
    assert_cache_clean(lora_server)
    assert not any(p.name.startswith(("hang", "reset", "extra")) for p in cache_files(lora_server))
    lora_server.wait_status(timeout=10)
    assert reference_output(lora_server) == reference_output(server)  # no adapter left behind


def test_hostile_loras_do_not_change_what_the_next_caller_gets(lora_server, lora_host, lora_bytes, server):
    """The probe's sequence on the real server: a LoRA whose adapter metadata names modules_to_save (it used to wrap
    norm_out for good), one with a rank of 0 in its metadata, one gzip-encoded by its server, a .tar.gz of 60,000
    empty files, then the same good LoRA and no LoRA: bit-identical to before and to a fresh server."""
    from tests.helpers import hostile, loras

    status, body = lora_server.predict({**REFERENCE, "replicate_weights": lora_host.url("/a.safetensors")})
    assert body["status"] == "succeeded", body.get("error")
    with_a = body["output"][0]
    transformer = tiny.build_pipeline().transformer
    update = loras.make_update(transformer, "ATTENTION", seed=5)
    cases = [
        (hostile.metadata_fields(update, modules_to_save=["norm_out"]), None),
        (hostile.metadata_fields(update, r=0), "adapter metadata gives rank r=0"),
        (hostile.targz_of_empty_members(60_000, lora_bytes[0]), "holds more than 1,000 files"),
    ]
    for body_bytes, message in cases:
        status, body = lora_server.predict({**REFERENCE, "replicate_weights": uri(body_bytes, "application/octet-stream")})
        if message is None:
            assert body["status"] == "succeeded", body.get("error")
        else:
            assert body["status"] == "failed" and message in body["error"] and "Traceback" not in body["error"], body
    status, body = lora_server.predict({**REFERENCE, "replicate_weights": lora_host.url("/gzip.safetensors")})
    assert body["status"] == "succeeded" and body["output"][0] == with_a, body.get("error")
    status, body = lora_server.predict({**REFERENCE, "replicate_weights": lora_host.url("/a.safetensors")})
    assert body["output"][0] == with_a
    lora_server.wait_status(timeout=10)
    assert reference_output(lora_server) == reference_output(server)


def test_cache_cap_keeps_the_cache_within_bounds(lora_server, lora_host, lora_bytes):
    outputs = []
    for name in ("a", "b", "a"):
        status, body = lora_server.predict({**REFERENCE, "replicate_weights": lora_host.url(f"/{name}.safetensors")})
        assert body["status"] == "succeeded", body.get("error")
        outputs.append(body["output"][0])
        assert sum(p.stat().st_size for p in cache_files(lora_server)) <= 1.5 * max(map(len, lora_bytes))
        assert_cache_clean(lora_server)
    assert outputs[0] == outputs[2] != outputs[1]


def test_cancel_during_a_lora_download_leaves_nothing(lora_server, lora_host, server):
    before = cache_files(lora_server)
    with WebhookReceiver() as hook:
        status, body = lora_server.request(
            "PUT", "/predictions/cancel-lora",
            {"input": {**REFERENCE, "replicate_weights": lora_host.url("/slow-start.safetensors")},
             "webhook": hook.hook_url, "webhook_events_filter": ["start", "completed"]},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202
        hook.wait_for(lambda e: any(x["status"] == "processing" for x in e))
        time.sleep(1.0)  # the server holds the LoRA for 3 s before answering
        lora_server.request("POST", "/predictions/cancel-lora/cancel")
        hook.wait_for(lambda e: any(x["status"] == "canceled" for x in e), timeout=10)
    lora_server.wait_status(timeout=10)
    time.sleep(3)  # let the abandoned transfer finish on the server side
    assert_cache_clean(lora_server)
    assert cache_files(lora_server) == before
    assert reference_output(lora_server) == reference_output(server)  # no adapter
    assert len(outputs_on_disk(lora_server.tmp)) <= 1


def test_secrets_never_appear_in_logs_errors_webhooks_or_file_names(lora_server):
    with WebhookReceiver() as hook:
        request = {"input": {**REFERENCE, "replicate_weights": "huggingface.co/someone/private-lora",
                             "hf_api_token": SECRET},
                   "webhook": hook.hook_url, "webhook_events_filter": ["start", "output", "logs", "completed"]}
        status, body = lora_server.request("POST", "/predictions", request, headers={"Prefer": "respond-async"})
        events = hook.wait_for(lambda e: any(x["status"] in ("succeeded", "failed") for x in e))
    assert events[-1]["status"] == "succeeded", events[-1].get("error")
    # without the token: refused with a hint, and the other caller's token is not reused
    status, failed = lora_server.predict({**REFERENCE, "replicate_weights": "huggingface.co/someone/private-lora"})
    assert failed["status"] == "failed" and "hf_api_token" in failed["error"]
    status, wrong = lora_server.predict({**REFERENCE, "replicate_weights": "huggingface.co/someone/private-lora",
                                         "hf_api_token": SECRET + "x"})
    assert wrong["status"] == "failed"
    lora_server.wait_status(timeout=10)
    seen = [repr(events), repr(body), repr(failed), repr(wrong), lora_server.log_path.read_text(errors="replace")]
    seen += [str(p) for p in lora_server.weights.rglob("*")] + [str(p) for p in lora_server.tmp.rglob("*")]
    seen += [p.read_text(errors="replace") for p in lora_server.weights.rglob("*.json") if p.is_file()]
    leaks = [s[:200] for s in seen if SECRET in s]
    assert not leaks, leaks


def test_lora_urls_on_private_addresses_are_refused(server_env, lora_host, tmp_path_factory):
    # Its own LoRA cache: a file another test fetched from 127.0.0.1 would be served from the cache unfetched.
    env, _ = server_env(FLUX_ALLOW_PRIVATE_URLS="0", FLUX_WEIGHTS_DIR=str(own_weights(tmp_path_factory)))
    count = len(lora_host.requests)
    with CogServer(tmp_path_factory.mktemp("hostile") / "cog.log", env=env) as srv:
        srv.wait_status()
        for reference in (lora_host.url("/a.safetensors"), lora_host.url("/a.safetensors").replace("127.0.0.1", "localhost"),
                          "http://169.254.169.254/latest/meta-data/lora.safetensors", "http://10.0.0.1/lora.safetensors"):
            status, body = srv.predict({**REFERENCE, "replicate_weights": reference})
            assert body["status"] == "failed" and "non-public address" in body["error"], (reference, body.get("error"))
    assert len(lora_host.requests) == count  # never contacted


def test_disk_full_while_saving_fails_cleanly(tmp_path, lora_bytes):
    """ENOSPC for real: the download's .part file is /dev/full."""
    from flux import download
    from flux.errors import UserError

    dest = tmp_path / "lora.safetensors"
    (tmp_path / "lora.safetensors.part").symlink_to("/dev/full")
    with FileServer() as srv:
        url = srv.add("/a.safetensors", lora_bytes[0], no_ranges=True)
        with pytest.raises(UserError, match="the disk is full"):
            download.download(url, dest, what="LoRA")
    assert list(tmp_path.iterdir()) == []  # nothing kept, not even the .part link


def peak_rss_growth(pid: int, work) -> int:
    """How far work() raised the worker's peak resident memory (VmHWM, reset first through clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = rss_bytes(pid)
    work()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 - before
    raise RuntimeError("no VmHWM")


def test_what_a_caller_can_make_the_worker_hold_or_wait_for_is_bounded_before_it_is_spent(lora_server, lora_host,
                                                                                          lora_bytes, server):
    """The second probe's floods, through the real server: a 768 MiB tar long name (a 785 KB .tar.gz), a zip64
    listing 1,000,000 entries (sent gzip-encoded), 200,000 tensors, a host that sends a byte or a header line at a
    time. Each is refused naming its limit, the worker's peak memory rising by less than 64 MB, the drips within
    FLUX_LORA_TIMEOUT_S (3 s here) plus 2 s; the next caller gets what a fresh server gives."""
    from tests.helpers import floods

    lora_host.add("/many.zip", floods.zip64_of_entries(1_000_000), encoding="gzip")
    lora_host.add("/flood.safetensors", floods.tensor_flood(200_000))
    cases = [
        (uri(floods.long_name_targz(768 * 2**20, lora_bytes[0]), "application/octet-stream"),
         "long-name and PAX headers come to more than 16.0 MiB"),
        (lora_host.url("/many.zip"), "zip archive holds more than 1,000 files"),
        (lora_host.url("/flood.safetensors"), "header lists 200,000 tensors, over the 20,000 limit (FLUX_LORA_MAX_TENSORS)"),
    ]
    pid = worker_pid(lora_server.process.pid)
    for reference, message in cases:
        failed = {}

        def work():
            failed.update(lora_server.predict({**REFERENCE, "replicate_weights": reference})[1])

        grew = peak_rss_growth(pid, work)
        assert failed["status"] == "failed" and message in failed["error"], failed.get("error")
        assert grew < 64 * 2**20, (message, grew)
    with floods.DripServer(every=0.2, lasts=20) as drip:
        for path in ("/body/lora.safetensors", "/headers/lora.safetensors"):
            started = time.monotonic()
            status, body = lora_server.predict({**REFERENCE, "replicate_weights": drip.url(path)})
            assert body["status"] == "failed" and "stopped sending data" in body["error"], body.get("error")
            assert time.monotonic() - started < 3 + 2, path
    assert_cache_clean(lora_server)
    lora_server.wait_status(timeout=10)
    assert reference_output(lora_server) == reference_output(server)
