"""The container's packages are enough: every path runs with only requirements.txt, cog.yaml's --no-deps pins and
cog's SDK importable (tests/helpers/runtime_only.py hides everything else this environment holds: the test tools of
requirements-dev.txt and whatever else is installed), so an import that only a dev requirement satisfies fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flux import variants
from tests.helpers import images, loras
from tests.helpers.inputs import defaults, for_variant
from tests.helpers.runtime_only import ROOT, build_context_filter, canonical, runtime_distributions

MODES = ["Off", "Lightly Juiced 🍊 (more consistent)", "Juiced 🔥 (default)", "Extra Juiced 🔥 (more speed)",
         "Blink of an eye 👁️"]


def run_child(tmp_path, spec: dict, weights_dir) -> subprocess.CompletedProcess:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "FLUX_WEIGHTS_DIR": str(weights_dir), "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", "tests.helpers.runtime_only", str(tmp_path / "spec.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_the_runtime_set_is_the_requirements_and_excludes_the_test_tools():
    allowed = runtime_distributions()
    assert {"torch", "diffusers", "transformers", "peft", "pruna", "pytorch-lightning", "cog", "coglet"} <= allowed
    dev_only = {canonical(n) for n in ("pytest", "replicate", "schemathesis", "hypothesis", "pydantic", "rich")}
    assert not allowed & dev_only
    assert len(allowed - {"cog", "coglet", "structlog"}) <= 100  # the goal for the image's packages


def test_a_module_only_the_dev_requirements_provide_is_not_importable(tmp_path):
    """The guard itself: with pytest hidden, the child's first import of it fails and the run fails."""
    spec = {"allowed": sorted(runtime_distributions()), "cases": [], "files": []}
    (tmp_path / "probe.py").write_text(
        "import json, sys\n"
        "from tests.helpers.runtime_only import hide_all_but\n"
        "hide_all_but(set(json.load(open(sys.argv[1]))['allowed']))\n"
        "import importlib.util, importlib.metadata\n"
        "assert importlib.util.find_spec('pytest') is None\n"
        "try:\n    importlib.metadata.version('pytest')\nexcept importlib.metadata.PackageNotFoundError:\n"
        "    print('metadata hidden')\n"
        "import torch, diffusers, pruna  # noqa: the runtime stays importable\n"
        "import pytest\n")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "spec.json")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "metadata hidden" in done.stdout, done.stderr[-2000:]
    assert "ModuleNotFoundError: No module named 'pytest'" in done.stderr


def test_every_path_runs_with_only_the_runtime_packages(engine, weights_dir, tmp_path):
    lora = loras.lora_uri(loras.make_update(engine.pipeline("dev", "txt2img").transformer, "ATTENTION", seed=3))
    image = images.save(images.gradient(320, 256), tmp_path, "image.png")
    mask = images.save(images.box_mask(320, 256, (0, 0, 160, 128)), tmp_path, "mask.png")
    base = {**defaults(), "aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 3, "seed": 5}
    cases = [("bf16", {}), ("go_fast", {"go_fast": True}),
             *((f"speed {m}", {"speed_mode": m}) for m in MODES[1:]),
             ("lora", {"replicate_weights": lora}), ("lora go_fast", {"replicate_weights": lora, "go_fast": True}),
             ("true cfg", {"negative_prompt": "blurry", "true_cfg_scale": 2.0}),
             ("img2img", {"image": str(image), "output_format": "jpg"}),
             ("inpaint", {"image": str(image), "mask": str(mask), "output_format": "png"}),
             *((f"{v.name}{fast}", {"model": v.name, "go_fast": bool(fast),
                                    **for_variant(v, str(image), str(mask))}) for v in variants.ON_FIRST_USE
               for fast in ("", " go_fast"))]
    spec = {"allowed": sorted(runtime_distributions()), "files": ["image", "mask"],
            "cases": [[name, {**base, **inputs}] for name, inputs in cases]}
    done = run_child(tmp_path, spec, weights_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["hidden modules"] > 0
    ran = {c["name"]: c for c in report["cases"]}
    assert list(ran) == [name for name, _ in cases]
    assert all(c["outputs"] for c in ran.values()), ran
    assert ran["inpaint"]["outputs"] == [".png"] and ran["img2img"]["outputs"] == [".jpg"]
    assert {c["path"] for c in ran.values()} == set(variants.transformer_names())
    assert {c["speed_mode"] for c in ran.values()} == set(MODES)
    in_image = build_context_filter((ROOT / ".dockerignore").read_text())
    assert {"predict.py", "flux/engine/run.py", "flux/lora/fuse.py"} <= set(report["project files"])
    assert [f for f in report["project files"] if not in_image(f)] == []  # everything the product ran is in the image


def test_the_build_context_is_the_product():
    in_image = build_context_filter((ROOT / ".dockerignore").read_text())
    for path in ("predict.py", "flux/engine/run.py", "flux/tarstream.py", "lora_loader.py", "cog.yaml", "requirements.txt",
                 "weights/README.md", "script/compile_cache.py", ".cog/openapi_schema.json", "LICENSE"):
        assert in_image(path), path
    for path in ("flux-compile-h100.tar", "weights/compile-bundle.tar", "flux/x.tar.gz", "docs/_bench/run/results.md",
                 "docs/benchmarks.md", "tests/test_speed.py", "weights/hf/model.safetensors", ".venv/bin/python",
                 "script/benchmark.py", "requirements-dev.txt", "output.0.webp", "flux/__pycache__/engine.pyc"):
        assert not in_image(path), path
