"""Every setting of the engine, read once from the environment into one object.

The optimization switches are declared in flux/switches.py (`SETTINGS`: FLUX_COMPILE, FLUX_FP8, FLUX_ATTENTION,
FLUX_FUSED_PROJECTIONS, FLUX_COMPILE_VAE, FLUX_CHANNELS_LAST, FLUX_INDUCTOR_TUNING_FLAGS, FLUX_WARMUP): `Settings`
has a field for each, made from those entries. Beside them:

  FLUX_COMPILE_CACHE         a compile bundle to boot from (`script/compile-cache export`): a local folder, an https URL
                             of a .tar of that folder, or a Hugging Face repo id. Default: the working folder
                             weights/compile-cache, which setup writes to after compiling.
  FLUX_SETUP_BUDGET_S        the seconds setup() may take, counted from the process's start (imports included):
                             once they run short, the work that can wait is deferred to the request that needs it
                             (flux/budget.py). Replicate fails a setup over 600 s. Default: 540.
  FLUX_PREFETCH              "1": once setup is done, the weights of the variants loaded on first use (flux/variants.py)
                             that must be downloaded are fetched in the background, so that their first request does
                             not wait for a download (flux/weights.py: Prefetch). Default: 1.
  FLUX_GPU_MEMORY_GB         the GPU memory this container plans with (flux/memory.py), in GB of 2**30 bytes as
                             nvidia-smi counts them: a cap on a GPU shared with other processes; more than the GPU
                             has is an error. On a machine without a GPU it simulates one of that size (the tests run
                             the offload paths of small GPUs that way). Default: the whole GPU.
  FLUX_HOST_MEMORY_GB        the CPU memory (RAM) this container may fill with weights, in GB of 2**30 bytes: what the
                             plan keeps off the GPU, and the variants loaded on first use, dropped least recently used
                             first (and read again from disk when asked for) where they would not fit beside it
                             (flux/hostmemory.py). Default: the machine's RAM less 8 GB for everything else.

The LoRA loader's settings (`LoraSettings`, flux/lora/sources.py) are read here too, once, when the engine is built:

  FLUX_LORA_MAX_BYTES        largest LoRA download, and most an archive may unpack to (default 2 GiB)
  FLUX_LORA_CACHE_GB         size cap of the on-disk LoRA cache under weights/loras (default 20)
  FLUX_LORA_TIMEOUT_S        longest a LoRA download may take (default 600)
  FLUX_LORA_RECHECK_S        how long a resolved unversioned reference is trusted (default 300)
  FLUX_LORA_MAX_HEADER_BYTES most bytes a LoRA file's parsers may hold before its content: a tar's long-name and PAX
                             headers together, a zip's central directory, the safetensors header (default 16 MiB)
  FLUX_LORA_MAX_TENSORS      most tensors a LoRA file may hold (default 20,000; FLUX LoRAs hold a few thousand)
  FLUX_LORA_MAX_FLOAT32_BYTES most bytes a LoRA's numbers may take once read in float32, counted from its header's
                             shapes before any is read (default twice FLUX_LORA_MAX_BYTES: a bf16 or fp16 file at the
                             download limit; an fp8 file takes four times its size)
  FLUX_REPLICATE_URL, FLUX_CIVITAI_URL, HF_ENDPOINT   where replicate.com, civitai.com and huggingface.co are
  HF_TOKEN, CIVITAI_API_TOKEN, REPLICATE_API_TOKEN    tokens for requests that bring none

`VARIABLES` lists every environment variable the project reads (these, the weights' and the LoRA loader's), so
that tests can start from none of them. A value that is not one a setting takes is a setup error naming it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import budget, switches, variants
from .errors import SettingsError
from .folders import compile_cache_dir, weights_dir
from .limits import HOST_RESERVE_BYTES, GiB

# Every environment variable the project reads (tests/conftest.py clears them all before a test run).
VARIABLES = (
    *(s.env for s in switches.SETTINGS), "FLUX_COMPILE_CACHE", "FLUX_GPU_MEMORY_GB", "FLUX_HOST_MEMORY_GB",
    "FLUX_PREFETCH", "FLUX_SETUP_BUDGET_S",
    # weights (flux/weights.py)
    *(v.setting for v in variants.VARIANTS.values()), "COG_WEIGHTS", "FLUX_SAFETY_CHECKER", "FLUX_SAFETY_SECOND",
    "FLUX_WEIGHTS_DIR", "FLUX_WEIGHTS_HOST", "HF_TOKEN",
    # LoRAs (lora_loader.py)
    "FLUX_LORA_MAX_BYTES", "FLUX_LORA_CACHE_GB", "FLUX_LORA_RECHECK_S", "FLUX_LORA_TIMEOUT_S",
    "FLUX_LORA_MAX_HEADER_BYTES", "FLUX_LORA_MAX_TENSORS", "FLUX_LORA_MAX_FLOAT32_BYTES", "FLUX_REPLICATE_URL",
    "FLUX_CIVITAI_URL", "FLUX_ALLOW_PRIVATE_URLS", "CIVITAI_API_TOKEN", "REPLICATE_API_TOKEN",
)


def _gb(env: dict, name: str, what: str, example: str, unset: str) -> int | None:
    """A size in GB of 2**30 bytes, as bytes; None when unset."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name}={raw!r} is not a size: set it to the GB of {what} this container may use, e.g. "
                            f"{example}, or unset it {unset}.")
    return int(value * GiB)


def _host_memory(env: dict) -> int:
    limit = _gb(env, "FLUX_HOST_MEMORY_GB", "CPU memory", "48", "to use the machine's RAM less 8 GB")
    if limit is not None:
        return limit
    import psutil

    return max(psutil.virtual_memory().total - HOST_RESERVE_BYTES, 0)


def _gpu_memory(env: dict, device: torch.device) -> int | None:
    limit = _gb(env, "FLUX_GPU_MEMORY_GB", "GPU memory", "40", "to use the whole GPU")
    if limit is None:
        return None
    raw = env["FLUX_GPU_MEMORY_GB"].strip()
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if limit > total:
            raise SettingsError(f"FLUX_GPU_MEMORY_GB={raw} is more than this GPU has ({total / GiB:.1f} GB): set it to "
                                f"{total / GiB:.1f} or less, or unset it to use the whole GPU.")
    return limit


class _Settings:
    """The engine's settings: a field per switch of flux/switches.py's SETTINGS (the value it is read as), and the
    settings beside them. Build it with `Settings.from_env(device, weights_dir)`."""

    @classmethod
    def from_env(cls, device: torch.device, weights_dir: Path, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        values = switches.read(env, device)  # in order, the conflicts settled
        compiling = values["compile"] is not None
        return cls(
            **values,
            fp8_forced=values["fp8"] == "fp8dqrow" and not switches.fp8_supported(device),
            compile_cache=((env.get("FLUX_COMPILE_CACHE") or "").strip() or None) if compiling else None,
            cache_dir=compile_cache_dir(weights_dir) if compiling else None,
            gpu_memory=_gpu_memory(env, device),
            host_memory=_host_memory(env),
            prefetch=switches.flag(True)("FLUX_PREFETCH", (env.get("FLUX_PREFETCH") or "").strip(), device, values),
            setup_budget_s=_number(env, "FLUX_SETUP_BUDGET_S", budget.DEFAULT_S),
        )

    @classmethod
    def for_device(cls, device: torch.device) -> "Settings":
        """What a Settings made in code has (tests, tools): every setting unset, go_fast's fp8 the device's."""
        return cls(fp8=switches.fp8_kind(device))

    @property
    def dtype_on_cpu(self) -> torch.dtype:
        """Per-row float8 quantizes bf16 weights only, so the fp8dqrow path makes a CPU run in bf16 too."""
        return torch.bfloat16 if self.fp8 == "fp8dqrow" else torch.float32

    def graph_settings(self) -> dict[str, Any]:
        """The switches that change compiled graphs, as the compile-cache key holds them."""
        return {s.name: getattr(self, s.name) for s in switches.SETTINGS if s.graphs}

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "cache_dir")


Settings = dataclasses.make_dataclass(
    "Settings",
    [(s.name, Any, field(default=s.unset)) for s in switches.SETTINGS] + [
        # fp8dqrow asked for on a machine torchao's hardware check refuses (a CPU): the check is skipped
        ("fp8_forced", bool, field(default=False)),
        ("compile_cache", Any, field(default=None)),  # the bundle to boot from; None: the working folder only
        ("gpu_memory", Any, field(default=None)),  # bytes FLUX_GPU_MEMORY_GB caps the plan at (simulated on a CPU)
        ("host_memory", Any, field(default=None)),  # bytes of RAM for weights (FLUX_HOST_MEMORY_GB); None: no limit
        ("cache_dir", Any, field(default=None)),  # the working compile folder; None: not compiling
        ("prefetch", bool, field(default=False)),  # fetch the variants loaded on first use in the background
        ("setup_budget_s", float, field(default=float("inf"))),  # FLUX_SETUP_BUDGET_S; inf: unbounded
    ],
    bases=(_Settings,), frozen=True,
)
Settings.__module__ = __name__


def _number(env: dict, name: str, default: float, zero: bool = False) -> float:
    """A positive number (or 0 where `zero`), its default when unset; anything else names the setting."""
    raw = (env.get(name) or "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = float("nan")
    if not (value > 0 or zero and value == 0) or value == float("inf"):
        raise SettingsError(f"{name}={raw!r} is not a positive number: set it to one, or unset it for {default:g}.")
    return value


def sendable_token(token: str | None, name: str, error: type[Exception] = SettingsError) -> str | None:
    """A token as it is sent (stripped of surrounding whitespace; None when empty), or `error` naming `name` when it
    holds anything but printable ASCII (a character a header cannot carry, a line break, a space inside). The
    message never holds the token, nor its length."""
    token = (token or "").strip()
    if not all("!" <= c <= "~" for c in token):
        raise error(f"{name} is not a token this container can send: a token is printable ASCII without spaces or "
                    "line breaks. Copy it again from the site that issued it.")
    return token or None


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA loader's settings (flux/lora/sources.py), read once: limits, the cache, where the hosts are, and the
    tokens used for requests that bring none (never in a repr)."""

    max_bytes: int = 2 * GiB
    cache_bytes: int = 20 * GiB
    cache_dir: Path = field(default_factory=lambda: weights_dir() / "loras")
    timeout_s: float = 600.0
    recheck_s: float = 300.0
    max_header_bytes: int = 16 * 2**20
    max_tensors: int = 20_000
    max_float32_bytes: int = 4 * GiB  # from_env: twice max_bytes unless set
    replicate_url: str = "https://replicate.com"
    civitai_url: str = "https://civitai.com"
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = field(default=None, repr=False)
    civitai_token: str | None = field(default=None, repr=False)
    replicate_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: dict | None = None) -> "LoraSettings":
        env = os.environ if env is None else env

        def url(name: str, default: str) -> str:
            return ((env.get(name) or "").strip() or default).rstrip("/")

        max_bytes = int(_number(env, "FLUX_LORA_MAX_BYTES", cls.max_bytes))
        return cls(
            max_bytes=max_bytes,
            cache_bytes=int(_number(env, "FLUX_LORA_CACHE_GB", cls.cache_bytes / GiB) * GiB),
            timeout_s=_number(env, "FLUX_LORA_TIMEOUT_S", cls.timeout_s),
            recheck_s=_number(env, "FLUX_LORA_RECHECK_S", cls.recheck_s, zero=True),
            max_header_bytes=int(_number(env, "FLUX_LORA_MAX_HEADER_BYTES", cls.max_header_bytes)),
            max_tensors=int(_number(env, "FLUX_LORA_MAX_TENSORS", cls.max_tensors)),
            max_float32_bytes=int(_number(env, "FLUX_LORA_MAX_FLOAT32_BYTES", 2 * max_bytes)),
            replicate_url=url("FLUX_REPLICATE_URL", cls.replicate_url),
            civitai_url=url("FLUX_CIVITAI_URL", cls.civitai_url),
            hf_endpoint=url("HF_ENDPOINT", cls.hf_endpoint),
            hf_token=sendable_token(env.get("HF_TOKEN"), "HF_TOKEN"),
            civitai_token=sendable_token(env.get("CIVITAI_API_TOKEN"), "CIVITAI_API_TOKEN"),
            replicate_token=sendable_token(env.get("REPLICATE_API_TOKEN"), "REPLICATE_API_TOKEN"),
        )
