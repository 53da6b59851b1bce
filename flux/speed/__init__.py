"""The optimizations and the speed modes.

`SWITCHES` has one entry per optimization: its setting (flux/switches.py: the environment variable, how the value is
read and defaulted, what it requires of the other switches and what it cannot run with, whether it changes the
compiled graphs), the stage it applies at and the function that applies it. The engine runs each stage through
`optimize(stage, target, settings)` and reads no switch by name; a new optimization is one setting in
flux/switches.py and one entry here. The order is SWITCHES' order, stage by stage, as the engine builds:

  transformer   attention, fused_projections   every bf16 transformer before it is copied, smashed or compiled
  vae           channels_last, compile_vae      the shared VAE: its memory format, its decoder compiled
  fp8           fp8                             go_fast's copy of each bf16 transformer (flux/speed/fp8.py), a block
                                                at a time
                (step caches)                   pruna's smash installs them on every copy (flux/speed/step_cache.py)
  copy          inductor_tuning, compile        each copy's blocks compiled beneath the step caches (flux/compiler.py)
  setup         warmup                          setup compiles every schema size before the first request

`SPEED_MODES` are Pruna's levels: each names a step cache and its parameters, and whether it runs the fp8 copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import compiler, switches
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


def _fused_projections(transformer, on: bool, settings, **context) -> None:
    fuse_projections(transformer, on)


def _attention(transformer, name: str, settings, **context) -> None:
    set_attention(transformer, name)


def _channels_last(vae, on: bool, settings, **context) -> None:
    vae_channels_last(vae, on)


def _compile_vae(vae, on: bool, settings, **context):
    return compiler.compile_vae_decoder(vae, settings.compile) if on else None


def _fp8(source, kind: str, settings, device: torch.device, bf16, **context):
    fp8 = fp8_.fp8_transformer(source, kind, device, settings.fp8_forced)
    return fp8, fp8_.Fp8Sync(bf16, fp8, kind, settings.fp8_forced)


def _inductor_tuning(transformer, on: bool, settings, **context) -> None:
    compiler.tune_inductor(on)  # after torchao's quantization, which sets inductor flags of its own


def _compile(transformer, backend: str | None, settings, fp8: bool, **context):
    if backend is None:
        return None
    compiler.limit_recompiles()
    # torchao's dynamic float8 asks whether the batch is 1 (flux/compiler.py): that copy keeps batch 1 apart
    batch = "backed" if fp8 and settings.fp8 == "fp8dqrow" else "unbacked"
    return compiler.compile_blocks(transformer, backend, batch)


def _warmup(engine, on: bool, settings, **context) -> None:
    if on:
        engine.warm_up()


@dataclass(frozen=True)
class Switch:
    """An optimization: its setting (flux/switches.py: the name, the environment variable, how it is read, what it
    requires of the others), the stage it applies at and the function that applies it there: (target, value,
    settings, **the stage's context) -> what it made, or None. Its setting's fields read as its own
    (`switch.env`, `switch.compare`, ...)."""

    setting: switches.Setting
    stage: str  # a key of STAGES
    apply: Callable
    check: Callable[[object, torch.device], object] | None = None  # (value, device): refuses what cannot run here

    def __getattr__(self, name: str):
        return getattr(self.setting, name)


# What each stage's target is, and what `optimize` gives back for it.
STAGES = {
    "transformer": "each bf16 transformer before it is copied, smashed or compiled",
    "vae": "the shared VAE (gives back its compiled decoder, when compiling)",
    "fp8": "go_fast's copy of a bf16 transformer, built a block at a time (gives back the copy and its Fp8Sync)",
    "copy": "each copy after pruna's smash installed the step caches, its blocks compiled beneath them (gives back "
            "the compiled blocks, when compiling)",
    "setup": "the engine once built",
}
_SETTING = {s.name: s for s in switches.SETTINGS}
# In the order they apply: a stage after the one before it, and within a stage one after the other.
SWITCHES: tuple[Switch, ...] = (
    Switch(_SETTING["attention"], "transformer", _attention, check=lambda name, device: attention_backend(name, device)),
    Switch(_SETTING["fused_projections"], "transformer", _fused_projections),
    Switch(_SETTING["channels_last"], "vae", _channels_last),
    Switch(_SETTING["compile_vae"], "vae", _compile_vae),
    Switch(_SETTING["fp8"], "fp8", _fp8),
    Switch(_SETTING["inductor_tuning"], "copy", _inductor_tuning),
    Switch(_SETTING["compile"], "copy", _compile),
    Switch(_SETTING["warmup"], "setup", _warmup),
)
assert {s.name for s in SWITCHES} == set(_SETTING) and {s.stage for s in SWITCHES} == set(STAGES)


def check(settings, device: torch.device) -> None:
    """Refuse, before any work, settings whose switches conflict (made in code: `switches.read` settles those of the
    environment) and a setting this machine cannot run (a SettingsError saying what to set instead)."""
    values = _values(settings)
    for switch in SWITCHES:
        if (conflict := switch.conflict(values)) is not None:
            other = next(s.setting for s in SWITCHES if s.name == conflict.other)
            raise SettingsError(switches.conflict_message(switch.setting, other, conflict, values))
    for switch in SWITCHES:
        if switch.check is not None and switch.active(values):
            switch.check(values[switch.name], device)


def optimize(stage: str, target, settings, **context) -> list:
    """Every switch of `stage` applied to `target`, in SWITCHES' order, where what it requires of the other switches
    holds and nothing it conflicts with is on (each apply does nothing where its own value is off); what they made,
    in that order."""
    values = _values(settings)
    made = []
    for switch in SWITCHES:
        if switch.stage == stage and switch.active(values):
            result = switch.apply(target, values[switch.name], settings, **context)
            if result is not None:
                made.append(result)
    return made


def describe(stage: str, settings) -> str:
    """The switches of a stage that are on, with their values (for the log)."""
    values = _values(settings)
    return ", ".join(f"{s.name} {values[s.name]}" for s in SWITCHES
                     if s.stage == stage and values[s.name] and s.active(values))


def _values(settings) -> dict:
    return {s.name: getattr(settings, s.name) for s in switches.SETTINGS}
