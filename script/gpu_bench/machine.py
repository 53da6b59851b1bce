"""The machine and the model: the shared pipeline every contender is built from, the versions each row records."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .names import SEED

ROOT = Path(__file__).resolve().parents[2]


def build_shared(args):
    """The pipeline every contender is built from: full-size random FLUX.1-dev on the GPU, or the tiny FLUX."""
    import torch

    from flux import weights
    from flux.fakes import fullsize
    from flux.engine import default_device

    device = default_device()
    dtype = torch.bfloat16  # FLUX's precision on a GPU; on a CPU the fp8 paths quantize bf16 weights
    if args.tiny:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(weights.locate(weights.TINY, "dev"), dtype=dtype).to(device)
    else:
        pipe = fullsize.build(device, dtype, seed=SEED)
    pipe.set_progress_bar_config(disable=True)
    return device, dtype, pipe


def rowwise_fp8_runs(device) -> bool:
    """Whether torch's _scaled_mm takes per-row scales here (CUDA with fp8 tensor cores; on a CPU, torch 2.14 does
    and 2.11 does not: 'Now _scaled_mm only supports per-tensor scaling')."""
    import torch

    if device.type == "cuda":
        from flux.switches import fp8_supported

        return fp8_supported(device)
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import torchao

    import pruna

    return {"torch": torch.__version__, "torchao": torchao.__version__, "diffusers": diffusers.__version__,
            "pruna": pruna.__version__, "python": platform.python_version()}


def pinned(name: str) -> str | None:
    """The version the container image pins for a package (script/image_pins.py)."""
    import image_pins

    return image_pins.versions(ROOT).get(image_pins.canonical(name))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 1024**3:.1f} GiB, CUDA {torch.version.cuda}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU"
