"""The H100 code path on this CPU: FLUX_FP8=fp8dqrow FLUX_COMPILE=inductor.

On an H100, go_fast is dynamic per-row float8 (torchao's Float8Tensor through torch._scaled_mm) and inductor compiles
every block. Asked for explicitly, the same code runs on a CPU: torchao's hardware check is skipped, _scaled_mm runs
on the CPU with row-wise scales, and inductor generates C++ instead of triton. Here, in order:

  1. `script/compile-cache export` in a fresh process compiles every path from scratch and writes a bundle;
  2. a second fresh process, with empty inductor and triton folders, boots from that bundle and compiles nothing
     from scratch (every FX graph is loaded: no cache miss);
  3. an engine in this process, booted from the bundle, serves go_fast and every speed mode, batches of 1 to 4,
     txt2img, img2img and inpainting, LoRA fuse, scale change and removal (fp8 weights bit-identical after), with
     dynamo's graph counts flat;
  4. the real cog server, booted from the bundle, serves them over HTTP without compiling during a prediction.

The VAE decoder is left eager here (FLUX_COMPILE_VAE=0): its compile on a 2-core CPU takes minutes, and
tests/test_speed.py covers it with dynamo's eager backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flux import compiler, speed
from flux.fakes import tiny
from flux.request import Request
from tests.helpers import images, loras
from tests.helpers.server import ROOT, CogServer, decode_image, file_uri

H100_PATH = {"FLUX_FP8": "fp8dqrow", "FLUX_COMPILE": "inductor", "FLUX_COMPILE_VAE": "0", "FLUX_WEIGHTS": "tiny"}
STEPS = 4


def compile_cache_export(tmp_path, name: str, dest, **env) -> tuple[dict, str]:
    """`script/compile-cache export DEST` in a fresh process with its own weights folder: its inductor and triton
    caches start empty (flux/__init__.py puts them in that folder's compile-cache/). Returns its report and log."""
    child = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    child |= {**H100_PATH, "FLUX_WEIGHTS_DIR": str(tmp_path / name), "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run([sys.executable, str(ROOT / "script" / "compile_cache.py"), "export", str(dest)],
                          cwd=ROOT, env=child, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle compiled from scratch by one fresh process."""
    tmp = tmp_path_factory.mktemp("h100")
    report, log = compile_cache_export(tmp, "first", tmp / "bundle")
    assert report["fx graphs compiled"] > 0 and report["fx graphs loaded"] == 0
    assert "compile cache: none yet" in log
    # bf16: one graph per block kind; fp8dqrow: batch 1 apart (torchao asks whether the batch is 1)
    assert f"graphs now held: {compiler.DOUBLE} 3, {compiler.SINGLE} 3" in log
    return tmp / "bundle"


def test_a_fresh_process_boots_from_the_bundle_and_compiles_nothing_from_scratch(bundle, tmp_path):
    assert not (tmp_path / "second").exists()  # its inductor and triton folders start empty
    report, log = compile_cache_export(tmp_path, "second", tmp_path / "again.tar", FLUX_COMPILE_CACHE=str(bundle))
    assert report["fx graphs compiled"] == 0 and report["fx graphs loaded"] > 0, report
    loaded = next(line for line in log.splitlines() if line.startswith("compile cache: loaded"))
    assert "inductor" in loaded and "aot_autograd" in loaded  # what load_cache_artifacts returned
    assert "COMPILE FAILED" not in log and report["digest"] == json.loads((bundle / "manifest.json").read_text())["digest"]
    assert (tmp_path / "again.tar").stat().st_size > 0


def test_the_benchmark_boot_section_boots_from_the_bundle_and_compiles_nothing(bundle, tmp_path):
    """script/benchmark gpu's boot section, in a fresh process with empty compile caches: the model built (here the
    tiny one), this engine booted from the bundle, nothing compiled from scratch."""
    child = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    child |= {"FLUX_COMPILE_VAE": "0", "FLUX_WEIGHTS_DIR": str(tmp_path / "boot"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "script" / "benchmark_gpu.py"), "--boot-child", str(bundle),
                           "--tiny", "--size", "512x512"], cwd=ROOT, env=child, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fx graphs compiled"] == 0 and report["fx graphs loaded"] > 0, report
    assert {"compile cache", "warm-up dev", "warm-up dev-fp8", "total"} <= set(report["stages"])


# ----- the engine, in this process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast(bundle, weights_dir):
    from flux import weights
    from flux.engine import load as engine_load

    torch._dynamo.reset()  # this process's other engines share the blocks' code objects
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**H100_PATH, "FLUX_COMPILE_CACHE": str(bundle)}.items():
            env.setenv(name, value)
        engine = engine_load(weights.sources(has_cuda=False))
    assert engine.settings.fp8 == "fp8dqrow" and engine.settings.fp8_forced and engine.dtype == torch.bfloat16
    return engine


def render(engine, **inputs) -> np.ndarray:
    req = Request.build(**{"prompt": "a knitted purple prune", "seed": 3, "num_inference_steps": STEPS,
                           "megapixels": "0.25", **inputs})
    return np.stack([np.asarray(img, dtype=np.float32) for img in engine.generate(req).images])


def fp8_state(engine) -> list[torch.Tensor]:
    return [t.view(torch.uint8).clone() if t.element_size() == 1 else t.clone()
            for m in engine.copy("dev-fp8").transformer.modules() if hasattr(getattr(m, "weight", None), "qdata")
            for t in (m.weight.qdata, m.weight.scale)]


def test_go_fast_is_dynamic_per_row_float8_compiled(fast):
    layer = fast.copy("dev-fp8").transformer.transformer_blocks[0].attn.to_qkv
    assert type(layer.weight).__name__ == "Float8Tensor" and layer.weight.qdata.dtype == torch.float8_e4m3fn
    assert layer.weight.act_quant_kwargs is not None  # activations quantized too: dynamic, not weight-only
    assert all(c.regions for path in ("dev", "dev-fp8") for c in fast.copy(path).compiled)


def test_every_mode_batch_and_task_runs_with_flat_graph_counts(fast, tmp_path):
    graphs = fast.graphs()
    assert graphs == {compiler.DOUBLE: 3, compiler.SINGLE: 3}
    src = images.save(images.gradient(512, 512), tmp_path, "src.png")
    mask = tmp_path / "mask.png"
    from PIL import Image

    Image.fromarray(np.pad(np.full((256, 256), 255, np.uint8), 128)).save(mask)
    base = render(fast)
    for inputs in [{"go_fast": True}, *({"speed_mode": m.name, "go_fast": True} for m in speed.SPEED_MODES[1:]),
                   *({"go_fast": True, "num_outputs": n} for n in (2, 3, 4)),
                   {"go_fast": True, "image": src, "prompt_strength": 0.9},
                   {"go_fast": True, "image": src, "mask": mask, "prompt_strength": 1.0},
                   {"speed_mode": "Juiced 🔥 (default)", "num_outputs": 2}, {"aspect_ratio": "16:9"}]:
        out = render(fast, **inputs)
        assert out.shape[0] == inputs.get("num_outputs", 1) and np.isfinite(out).all()
        if "image" not in inputs and "aspect_ratio" not in inputs:
            assert 0 < float(np.abs(out[:1] - base).mean()) < 25, inputs  # fp8 and FORA: close to bf16, not equal
        assert fast.graphs() == graphs, f"recompiled for {inputs}"
    batch = render(fast, go_fast=True, num_outputs=4)  # output i is seed + i: the same image as a batch of one
    assert float(np.abs(batch[1:2] - render(fast, go_fast=True, seed=4)).mean()) < 1.0  # (other graph: rounding)


def test_lora_fuse_scale_change_and_removal_on_fp8_is_exact(fast):
    transformer = fast.pipeline("dev", "txt2img").transformer
    update = loras.make_update(transformer, "ALL", seed=21, strength=2)
    graphs, before = fast.graphs(), fp8_state(fast)
    plain = render(fast, go_fast=True)
    with_lora = render(fast, go_fast=True, replicate_weights=loras.lora_uri(update))
    half = render(fast, go_fast=True, replicate_weights=loras.lora_uri(update), lora_scale=0.5)
    assert 0 < float(np.abs(half - plain).mean()) < float(np.abs(with_lora - plain).mean())
    assert not all(torch.equal(a, b) for a, b in zip(fp8_state(fast), before))  # re-quantized in place
    assert np.array_equal(render(fast, go_fast=True), plain)  # removed: bit-identical images
    assert all(torch.equal(a, b) for a, b in zip(fp8_state(fast), before))  # and fp8 weights
    assert fast.graphs() == graphs  # in-place re-quantization needs no recompile


# ----- the cog server ---------------------------------------------------------------------------------------------


@pytest.mark.server
def test_the_cog_server_boots_from_the_bundle_and_serves_the_h100_path(bundle, tmp_path, weights_dir):
    env = {**H100_PATH, "FLUX_COMPILE_CACHE": str(bundle), "FLUX_WEIGHTS_DIR": str(tmp_path / "weights"),
           # a fresh container's empty compile caches (not this process's, whose kernels are loaded)
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    src = images.save(images.gradient(480, 320), tmp_path, "in.png")
    update = loras.make_update(tiny.build_pipeline().transformer, "ALL", seed=8)
    with CogServer(tmp_path / "cog.log", env=env, setup_timeout=900) as server:
        server.wait_status()
        for inputs in [{"go_fast": True, "num_outputs": 4}, {"speed_mode": "Blink of an eye 👁️"},
                       {"speed_mode": "Lightly Juiced 🍊 (more consistent)", "num_outputs": 2},
                       {"go_fast": True, "image": file_uri(src), "prompt_strength": 0.9},
                       {"go_fast": True, "image": file_uri(src), "mask": file_uri(src), "prompt_strength": 1.0},
                       {"go_fast": True, "replicate_weights": loras.lora_uri(update), "lora_scale": 0.7}]:
            status, body = server.predict({"prompt": "a knitted purple prune", "num_inference_steps": STEPS,
                                           "megapixels": "0.25", "seed": 5, "output_format": "png", **inputs})
            assert status == 200 and body["status"] == "succeeded", (inputs, body.get("error"))
            assert len(body["output"]) == inputs.get("num_outputs", 1)
            assert all(decode_image(uri).format == "PNG" for uri in body["output"])
            assert "compiled new graphs" not in body["logs"], body["logs"]
    log = (tmp_path / "cog.log").read_text()
    assert "compile cache: loaded" in log and "COMPILE FAILED" not in log
    assert f"graphs now held: {compiler.DOUBLE} 3, {compiler.SINGLE} 3" in log


def test_kontext_and_fill_go_fast_compile_once_for_every_size_they_produce(fast, tmp_path):
    """kontext-dev's edits read twice the tokens (the image's beside the output's) at Kontext's own sizes; fill-dev's
    transformer reads 288 input channels here (384 full-size): each fp8 copy compiles on its first requests (batch 1
    apart from larger batches, as fp8dqrow does), then serves every size, batch and task with dynamo's graph counts
    flat."""
    wide, tall = (images.save(images.gradient(w, h), tmp_path, f"{w}.png") for w, h in ((480, 320), (320, 480)))
    mask = images.save(images.box_mask(480, 320, (96, 64, 288, 224)), tmp_path, "mask.png")
    first = render(fast, model="kontext-dev", go_fast=True, image=wide)
    for outputs in (1, 2):
        render(fast, model="fill-dev", go_fast=True, image=wide, mask=mask, num_outputs=outputs)
    graphs = fast.graphs()
    for inputs in [dict(model="kontext-dev", image=tall), dict(model="kontext-dev", image=wide, num_outputs=3),
                   dict(model="kontext-dev"), dict(model="kontext-dev", image=wide, mask=mask),
                   dict(model="kontext-dev", image=wide, speed_mode="Juiced 🔥 (default)"),
                   dict(model="fill-dev", image=tall, mask=images.save(images.box_mask(320, 480, (0, 0, 99, 99)),
                                                                       tmp_path, "m2.png"), num_outputs=2)]:
        out = render(fast, go_fast=True, **inputs)
        assert out.shape[0] == inputs.get("num_outputs", 1) and np.isfinite(out).all(), inputs
        assert fast.graphs() == graphs, f"recompiled for {inputs}"
    assert first.shape[1:3] == (416, 624) and all(c.regions for c in fast.copy("kontext-dev-fp8").compiled)
