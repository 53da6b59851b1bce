"""The driver check: a GPU torch cannot use is a setup error that names the requirement (a fake nvidia-smi on PATH
stands in for the NVIDIA driver; this machine has none)."""

from __future__ import annotations

import os
import sys

import pytest

from flux import gpu


def fake_nvidia_smi(folder, version: str) -> str:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!{sys.executable}\nprint({version!r})\n")
    exe.chmod(0o755)
    # coglet starts its worker as `python` from PATH: keep this interpreter's folder first after the fake one
    return os.pathsep.join([str(folder), os.path.dirname(sys.executable), os.environ["PATH"]])


def test_no_nvidia_driver_means_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert gpu.driver_version() is None and gpu.cuda_available() is False


def test_a_driver_too_old_for_cuda_13_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "550.54.15"))
    assert gpu.driver_version() == "550.54.15"
    with pytest.raises(gpu.GpuError, match=r"driver is 550\.54\.15; .* needs driver 580 or newer"):
        gpu.cuda_available()


def test_a_new_driver_torch_cannot_use_says_to_check_gpu_access(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "590.44.01"))
    with pytest.raises(gpu.GpuError, match=r"driver \(590\.44\.01\) is installed but .* --gpus all"):
        gpu.cuda_available()
