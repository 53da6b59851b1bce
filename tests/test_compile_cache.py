"""The compile bundle's rules, without compiling: its key holds no path, a mismatched or corrupt bundle costs a
recompile and a warning, an unreachable source is a setup error naming FLUX_COMPILE_CACHE.

A real bundle, exported from one process and booted from in a fresh one, is tests/test_h100_path.py's."""

from __future__ import annotations

import json

import pytest
import torch

from flux import compile_cache
from flux.errors import SettingsError
from flux.settings import Settings


@pytest.fixture
def ours(engine, weights_dir):
    settings = Settings(compile="inductor", fp8="fp8dqrow", cache_dir=weights_dir / "compile-cache")
    return compile_cache.key(settings, engine.pipeline("dev", "txt2img").transformer, torch.bfloat16,
                             torch.device("cpu"))


def bundle(folder, key, artifacts: bytes = b"") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / compile_cache.MANIFEST).write_text(json.dumps({"key": key, "digest": compile_cache.digest(key)}))
    (folder / compile_cache.ARTIFACTS).write_bytes(artifacts)


def test_the_key_names_software_gpu_settings_and_architecture_but_no_path(ours, weights_dir):
    text = json.dumps(ours)
    assert "/" not in text.replace(torch.__version__, "") and str(weights_dir) not in text
    assert "_name_or_path" not in ours["architecture"] and ours["architecture"]["num_layers"] == 1
    assert {"torch", "triton", "cpu", "isa", "fp8", "attention", "fused_projections", "compile"} <= set(ours)


def test_a_bundle_made_for_other_settings_costs_a_recompile_and_a_warning(ours, tmp_path, caplog):
    theirs = {**ours, "fp8": "fp8wo", "torch": "2.0.0"}
    bundle(tmp_path / "b", theirs)
    caplog.set_level("INFO", logger="flux")
    assert compile_cache.load(tmp_path / "b", ours, "the test bundle", tmp_path / "working") is False
    assert "was made for other fp8, torch" in caplog.text and "compiling from scratch" in caplog.text


@pytest.mark.parametrize("damage", ["garbage artifacts", "no manifest", "manifest not JSON"])
def test_a_corrupt_bundle_costs_a_recompile_and_a_warning(ours, tmp_path, caplog, damage):
    folder = tmp_path / "b"
    bundle(folder, ours, b"\x00 not torch's artifacts \xff" * 10)
    if damage == "no manifest":
        (folder / compile_cache.MANIFEST).unlink()
    if damage == "manifest not JSON":
        (folder / compile_cache.MANIFEST).write_text("{truncated")
    caplog.set_level("INFO", logger="flux")
    assert compile_cache.load(folder, ours, "the test bundle", tmp_path / "working") is False
    assert "the test bundle unusable" in caplog.text and "compiling from scratch" in caplog.text


@pytest.mark.parametrize("source", ["/nonexistent/compile-bundle", "http://127.0.0.1:9/bundle.tar",
                                    "someone/compile-bundle"])
def test_an_unreachable_source_is_a_setup_error_naming_the_setting(tmp_path, source):
    settings = Settings(compile="inductor", compile_cache=source, cache_dir=tmp_path / "compile-cache")
    with pytest.raises(SettingsError, match="FLUX_COMPILE_CACHE"):
        compile_cache.fetch(settings)


def test_no_bundle_yet_is_not_an_error(tmp_path, caplog):
    settings = Settings(compile="inductor", cache_dir=tmp_path / "compile-cache")
    assert compile_cache.fetch(settings) is None
    caplog.set_level("INFO", logger="flux")
    assert compile_cache.load(None, {}, "weights/compile-cache", tmp_path) is False
    assert "none yet" in caplog.text
