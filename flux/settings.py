"""How the fast paths are built: every speed setting, read once from the environment into one object.

The names follow huggingface/flux-fast's benchmark flags, so that each optimization has its own switch and
`script/benchmark gpu` can measure it on and off:

  FLUX_COMPILE               torch.compile backend for the transformer blocks (and the VAE decoder): "inductor",
                             "eager", "aot_eager", ... or "off". Default: inductor on a GPU, off on a CPU.
  FLUX_FP8                   go_fast's fp8: "auto" (dynamic per-row float8 on compute capability 8.9 and up, weight-only
                             fp8 elsewhere), "fp8dqrow" (dynamic per-row float8; asked for explicitly it also runs where
                             torchao's hardware check refuses, a CPU included, through torch's own _scaled_mm) or
                             "fp8wo" (weight-only fp8). Default: auto.
  FLUX_ATTENTION             "sdpa" (PyTorch's scaled_dot_product_attention, which picks its own kernel), "cudnn"
                             (cuDNN's attention through SDPA) or "fa3" (FlashAttention-3, Hopper only: the
                             flash_attn_interface package, or the kernels-community/flash-attn3 kernel from the Hugging
                             Face kernel hub through the `kernels` package; the image has neither, so fa3 is a setup
                             error unless one is added). Default: sdpa.
  FLUX_FUSED_PROJECTIONS     "1": q, k and v projections fused into one matmul per attention (LoRAs still fuse exactly;
                             flux/speed.py). Default: 1.
  FLUX_COMPILE_VAE           "1": the VAE decoder compiled too. Default: 1 when compiling.
  FLUX_CHANNELS_LAST         "1": the VAE in channels_last memory format. Default: 1.
  FLUX_INDUCTOR_TUNING_FLAGS "1": inductor's tuning flags of the published recipes (coordinate descent tuning,
                             1x1 convolutions as matmuls, no epilogue fusion). Default: 1 on a GPU when compiling.
  FLUX_WARMUP                "1": setup compiles every schema size on each compiled path. Default: 1 when compiling.
  FLUX_COMPILE_CACHE         a compile bundle to boot from (`script/compile-cache export`): a local folder, an https URL
                             of a .tar of that folder, or a Hugging Face repo id. Default: the working folder
                             weights/compile-cache, which setup writes to after compiling.
  FLUX_GPU_MEMORY_GB         the GPU memory this container plans with (flux/memory.py), in GB of 2**30 bytes as
                             nvidia-smi counts them: a cap on a GPU shared with other processes; more than the GPU
                             has is an error. On a machine without a GPU it simulates one of that size (the tests run
                             the offload paths of small GPUs that way). Default: the whole GPU.

A value that is not one of these is a setup error naming the setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .errors import UserError
from .memory import GiB
from .paths import compile_cache_dir

FP8_KINDS = ("fp8dqrow", "fp8wo")
ATTENTION_BACKENDS = ("sdpa", "cudnn", "fa3")
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
_OFF = ("off", "0", "false", "none", "no")


class SettingsError(UserError):
    """A setting (environment variable) has a value this container does not know; the message names it."""


def _flag(env: dict, name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SettingsError(f"{name}={env.get(name)!r} is not a switch: set it to 1 or 0.")


def _choice(env: dict, name: str, default: str, choices) -> str:
    raw = (env.get(name) or "").strip().lower() or default
    if raw not in choices:
        raise SettingsError(f"{name}={env.get(name)!r} is not one of {', '.join(choices)}.")
    return raw


def _compile_backend(env: dict, device: torch.device) -> str | None:
    raw = (env.get("FLUX_COMPILE") or "").strip()
    if not raw:
        return "inductor" if device.type == "cuda" else None
    if raw.lower() in _OFF:
        return None
    known = torch._dynamo.list_backends(exclude_tags=())
    if raw not in known:
        raise SettingsError(f"FLUX_COMPILE={raw!r} is not a torch.compile backend: use off, {', '.join(sorted(known))}.")
    return raw


def _gpu_memory(env: dict, device: torch.device) -> int | None:
    raw = (env.get("FLUX_GPU_MEMORY_GB") or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"FLUX_GPU_MEMORY_GB={raw!r} is not a size: set it to the GB of GPU memory this container "
                            "may use, e.g. 40, or unset it to use the whole GPU.")
    limit = int(value * GiB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if limit > total:
            raise SettingsError(f"FLUX_GPU_MEMORY_GB={raw} is more than this GPU has ({total / GiB:.1f} GB): set it to "
                                f"{total / GiB:.1f} or less, or unset it to use the whole GPU.")
    return limit


def fp8_kind(device: torch.device, asked: str = "auto") -> str:
    """The quant type for go_fast: dynamic per-row float8 where the GPU has fp8 tensor cores, else weight-only;
    an explicit choice is kept."""
    if asked != "auto":
        return asked
    return "fp8dqrow" if fp8_supported(device) else "fp8wo"


def fp8_supported(device: torch.device) -> bool:
    """Whether torchao's own hardware check accepts dynamic float8 here (CUDA 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class Settings:
    compile: str | None = None  # torch.compile backend, None: eager
    fp8: str = "fp8wo"  # the fp8 quant type go_fast runs (resolved from FLUX_FP8)
    fp8_forced: bool = False  # fp8dqrow asked for on a CPU, which torchao's hardware check refuses: it is skipped
    attention: str = "sdpa"
    fused_projections: bool = True
    compile_vae: bool = False
    channels_last: bool = True
    inductor_tuning: bool = False
    warmup: bool = False
    compile_cache: str | None = None  # the bundle to boot from; None: the working folder only
    gpu_memory: int | None = None  # bytes FLUX_GPU_MEMORY_GB caps the plan at (simulated on a CPU); None: the GPU's
    cache_dir: Path | None = None  # the working folder (compile artifacts written after a boot); None: not compiling

    @classmethod
    def from_env(cls, device: torch.device, weights_dir: Path, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        backend = _compile_backend(env, device)
        fp8 = fp8_kind(device, _choice(env, "FLUX_FP8", "auto", ("auto", *FP8_KINDS)))
        gpu = device.type == "cuda"
        if fp8 == "fp8dqrow" and gpu and not fp8_supported(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise SettingsError(f"FLUX_FP8=fp8dqrow needs fp8 tensor cores (compute capability 8.9 or newer); this GPU "
                                f"is {major}.{minor}. Use FLUX_FP8=auto or fp8wo.")
        return cls(
            compile=backend,
            fp8=fp8,
            fp8_forced=fp8 == "fp8dqrow" and not fp8_supported(device),
            attention=_choice(env, "FLUX_ATTENTION", "sdpa", ATTENTION_BACKENDS),
            fused_projections=_flag(env, "FLUX_FUSED_PROJECTIONS", True),
            compile_vae=backend is not None and _flag(env, "FLUX_COMPILE_VAE", True),
            channels_last=_flag(env, "FLUX_CHANNELS_LAST", True),
            inductor_tuning=backend == "inductor" and _flag(env, "FLUX_INDUCTOR_TUNING_FLAGS", gpu),
            warmup=backend is not None and _flag(env, "FLUX_WARMUP", True),
            compile_cache=((env.get("FLUX_COMPILE_CACHE") or "").strip() or None) if backend else None,
            cache_dir=compile_cache_dir(weights_dir) if backend else None,
            gpu_memory=_gpu_memory(env, device),
        )

    @property
    def dtype_on_cpu(self) -> torch.dtype:
        """Per-row float8 quantizes bf16 weights only, so the fp8dqrow path makes a CPU run in bf16 too."""
        return torch.bfloat16 if self.fp8 == "fp8dqrow" else torch.float32

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "cache_dir")
