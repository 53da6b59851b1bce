"""The optimizations, declared once, and the speed modes.

`SWITCHES` has one entry per optimization: its setting (environment variable), how the value is read and
defaulted, whether it changes the compiled graphs, and the function that applies it. Settings (flux/settings.py),
the compile-cache key (flux/compile_cache.py), the test environment reset (tests/conftest.py) and the benchmark's
list of switches (script/benchmark_gpu.py) are made from these entries: a new optimization is one entry here plus
the function it names. The names follow huggingface/flux-fast's benchmark flags.

The engine applies them in this order (flux/engine/transformers.py):
  attention, fused_projections   to every bf16 transformer before it is copied, smashed or compiled
  channels_last                  to the shared VAE
  fp8                            go_fast's copy of each bf16 transformer (flux/speed/fp8.py), built a block at a time
  step caches                    pruna's smash installs them on every copy (flux/speed/step_cache.py)
  compile, inductor_tuning       each block compiled beneath the step caches (flux/compiler.py)
  compile_vae                    the VAE decoder compiled
  warmup                         setup compiles every schema size before the first request

`SPEED_MODES` are Pruna's levels: each names a step cache and its parameters, and whether it runs the fp8 copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import SettingsError
from . import fp8 as fp8_
from .projections import fuse_projections
from .step_cache import STEP_CACHES, StepCache

# ----- the speed modes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """A Pruna speed mode: a step cache (None: every step computes) at its parameters; `fp8` runs it on the fp8
    transformer."""

    name: str
    cache: str | None = None  # a key of STEP_CACHES
    params: dict = field(default_factory=dict)
    fp8: bool = False

    @property
    def caches(self) -> bool:
        return self.cache is not None

    @property
    def step_cache(self) -> type[StepCache] | None:
        return STEP_CACHES[self.cache] if self.cache else None

    def computed_steps(self, steps: int) -> int:
        """How many of `steps` denoising steps run the transformer blocks (the cache's own schedule)."""
        return self.step_cache.computed_steps(self.params, steps) if self.caches else steps


OFF = "Off"
SPEED_MODES = (
    Mode(OFF),
    Mode("Lightly Juiced 🍊 (more consistent)", "fora", {"interval": 2, "start_step": 6}),
    Mode("Juiced 🔥 (default)", "fora", {"interval": 2, "start_step": 2}),
    Mode("Extra Juiced 🔥 (more speed)", "fora", {"interval": 3, "start_step": 2}, fp8=True),
    Mode("Blink of an eye 👁️", "fora", {"interval": 5, "start_step": 1}, fp8=True),
)
SPEED_MODE_NAMES = tuple(m.name for m in SPEED_MODES)
_BY_NAME = {m.name: m for m in SPEED_MODES}


def mode(name: str) -> Mode:
    return _BY_NAME[name]


# ----- attention, VAE layout -------------------------------------------------------------------------------------

ATTENTION_BACKENDS = ("sdpa", "cudnn", "fa3")
ATTENTION = {"sdpa": "native", "cudnn": "_native_cudnn"}  # FLUX_ATTENTION -> diffusers' backend name (fa3 below)


def attention_backend(name: str, device: torch.device) -> str:
    """diffusers' attention backend for a FLUX_ATTENTION value, or a SettingsError saying why it cannot run here."""
    from diffusers.utils import is_flash_attn_3_available, is_kernels_available

    if name == "sdpa":
        return ATTENTION[name]
    if device.type != "cuda":
        raise SettingsError(f"FLUX_ATTENTION={name} needs an NVIDIA GPU; on this machine use FLUX_ATTENTION=sdpa.")
    if name == "cudnn":
        if not torch.backends.cudnn.is_available():
            raise SettingsError("FLUX_ATTENTION=cudnn: this torch has no cuDNN. Use FLUX_ATTENTION=sdpa.")
        return ATTENTION[name]
    if torch.cuda.get_device_capability(device)[0] != 9:
        raise SettingsError("FLUX_ATTENTION=fa3: FlashAttention-3 runs on Hopper GPUs (H100, H200) only. "
                            "Use FLUX_ATTENTION=cudnn or sdpa.")
    # The flash_attn_interface package where it is installed, else the kernel hub's build (fetched in setup). The
    # image has neither (requirements.txt: the `kernels` package and FlashAttention-3 are not in it).
    if is_flash_attn_3_available():
        return "_flash_3"
    if not is_kernels_available():
        raise SettingsError("FLUX_ATTENTION=fa3: FlashAttention-3 is not installed in this image (it needs the "
                            "flash_attn_interface package, or the `kernels` package for the kernel hub's build). "
                            "Use FLUX_ATTENTION=cudnn or sdpa.")
    return "_flash_3_hub"


def set_attention(transformer, name: str) -> None:
    """diffusers' attention dispatch for every attention processor of the transformer (FLUX_ATTENTION's value,
    already checked by `attention_backend` for this machine)."""
    backend = ATTENTION.get(name) or attention_backend(name, transformer.device)
    if backend == "native":
        return  # diffusers' default: torch's scaled_dot_product_attention
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformer.set_attention_backend(backend)
    except Exception as exc:  # the hub kernel cannot be fetched, or a package is missing
        raise SettingsError(f"FLUX_ATTENTION: the {backend} attention backend cannot be used here ({exc}). "
                            "Use FLUX_ATTENTION=sdpa or cudnn.") from None


def vae_channels_last(vae, on: bool = True) -> None:
    if on:
        vae.to(memory_format=torch.channels_last)


# ----- the switches ----------------------------------------------------------------------------------------------

_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
_OFF = ("off", "0", "false", "none", "no")


def flag(default: Callable[[torch.device, dict], bool] | bool, needs: Callable[[dict], bool] = lambda v: True):
    """A 0/1 switch: its default (a value, or one made from the device and the switches read before it), and when
    it applies at all (`needs`: False leaves it off whatever is set)."""

    def read(env: str, raw: str, device: torch.device, values: dict) -> bool:
        if not needs(values):
            return False
        if not raw:
            return default(device, values) if callable(default) else default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(f"{env}={raw!r} is not a switch: set it to 1 or 0.")

    return read


def choice(choices: tuple[str, ...], default: str):
    def read(env: str, raw: str, device: torch.device, values: dict) -> str:
        value = raw.lower() or default
        if value not in choices:
            raise SettingsError(f"{env}={raw!r} is not one of {', '.join(choices)}.")
        return value

    return read


def _compile_backend(env: str, raw: str, device: torch.device, values: dict) -> str | None:
    if not raw:
        return "inductor" if device.type == "cuda" else None
    if raw.lower() in _OFF:
        return None
    known = torch._dynamo.list_backends(exclude_tags=())
    if raw not in known:
        raise SettingsError(f"{env}={raw!r} is not a torch.compile backend: use off, {', '.join(sorted(known))}.")
    return raw


def _fp8_kind(env: str, raw: str, device: torch.device, values: dict) -> str:
    kind = fp8_.fp8_kind(device, choice(("auto", *fp8_.KINDS), "auto")(env, raw, device, values))
    if kind == "fp8dqrow" and device.type == "cuda" and not fp8_.fp8_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise SettingsError(f"{env}=fp8dqrow needs fp8 tensor cores (compute capability 8.9 or newer); this GPU "
                            f"is {major}.{minor}. Use {env}=auto or fp8wo.")
    return kind


def _compiling(values: dict) -> bool:
    return values["compile"] is not None


@dataclass(frozen=True)
class Switch:
    name: str  # the Settings field
    env: str  # the environment variable
    read: Callable[[str, str, torch.device, dict], Any]  # (env, raw text or "", device, switches read so far) -> value
    unset: Any  # its value in a Settings made in code without it (tests, the benchmark's engines)
    graphs: bool  # changes the compiled graphs: part of the compile-cache key
    applies: str  # what it does, where (the function that applies it, or the module that reads the value)
    apply: Callable | None = None  # (module, value): applied to each bf16 transformer (target "transformer") or the VAE
    target: str | None = None  # "transformer" or "vae"; None: the engine reads the value where it builds
    compare: tuple[str, ...] = ()  # values `script/benchmark gpu` measures against the default, one engine each
    # it changes compiler settings that dynamo does not guard on: a benchmark engine with it compiles afresh (dynamo
    # reset, its own inductor cache) or it would reuse the graphs compiled without it
    unguarded: bool = False


SWITCHES: tuple[Switch, ...] = (
    Switch("compile", "FLUX_COMPILE", _compile_backend, None, True,
           "torch.compile backend for each transformer block (and the VAE decoder): flux/compiler.py; "
           "inductor on a GPU, off on a CPU", compare=("off",)),
    Switch("fp8", "FLUX_FP8", _fp8_kind, "fp8wo", True,
           "go_fast's fp8: auto (dynamic per-row float8 on compute capability 8.9+, weight-only fp8 elsewhere), "
           "fp8dqrow or fp8wo: flux/speed/fp8.py"),
    Switch("attention", "FLUX_ATTENTION", choice(ATTENTION_BACKENDS, "sdpa"), "sdpa", True,
           "diffusers' attention backend: sdpa, cudnn or fa3 (Hopper, where flash_attn_interface or the `kernels` "
           "package is installed; the image has neither): set_attention", set_attention, "transformer",
           compare=("cudnn", "fa3")),
    Switch("fused_projections", "FLUX_FUSED_PROJECTIONS", flag(True), True, True,
           "q, k, v in one matmul: flux/speed/projections.py", fuse_projections, "transformer", compare=("0",)),
    Switch("compile_vae", "FLUX_COMPILE_VAE", flag(True, _compiling), False, True,
           "the VAE decoder compiled too (when compiling): flux/compiler.py", compare=("0",)),
    Switch("channels_last", "FLUX_CHANNELS_LAST", flag(True), True, True,
           "the VAE in channels_last memory format: vae_channels_last", vae_channels_last, "vae", compare=("0",)),
    Switch("inductor_tuning", "FLUX_INDUCTOR_TUNING_FLAGS",
           flag(lambda device, v: device.type == "cuda", lambda v: v["compile"] == "inductor"), False, True,
           "inductor's tuning flags of the published recipes (on a GPU, with inductor): flux/compiler.py",
           compare=("0",), unguarded=True),
    Switch("warmup", "FLUX_WARMUP", flag(True, _compiling), False, False,
           "setup compiles every schema size on each compiled copy (when compiling): flux/engine/build.py"),
)


def apply(target: str, module, settings) -> None:
    """Every switch that applies to `target` ("transformer": each bf16 transformer before it is copied, smashed or
    compiled; "vae": the shared VAE), in declaration order, where its setting is on."""
    for switch in SWITCHES:
        value = getattr(settings, switch.name)
        if switch.target == target and value:
            switch.apply(module, value)
