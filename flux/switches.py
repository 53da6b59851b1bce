"""The optimization switches as settings: for each, its name (the Settings field), its environment variable, how
its value is read and defaulted, what it requires of the switches read before it, and whether it changes the compiled
graphs. Settings (flux/settings.py), the compile-cache key (flux/compile_cache.py), the test environment reset
(tests/conftest.py) and the benchmark's list of switches are made from these entries; flux/speed gives each its stage
and the function that applies it (`speed.SWITCHES`). The names follow huggingface/flux-fast's benchmark flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import SettingsError

FP8_KINDS = ("fp8dqrow", "fp8wo")
ATTENTION_BACKENDS = ("sdpa", "cudnn", "fa3")


def fp8_kind(device: torch.device, asked: str = "auto") -> str:
    """The quant type for go_fast: dynamic per-row float8 where the GPU has fp8 tensor cores, else weight-only;
    an explicit choice is kept."""
    if asked != "auto":
        return asked
    return "fp8dqrow" if fp8_supported(device) else "fp8wo"


def fp8_supported(device: torch.device) -> bool:
    """Whether torchao's own hardware check accepts dynamic float8 here (CUDA 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# ----- reading a value ---------------------------------------------------------------------------------------------

_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
_OFF = ("off", "0", "false", "none", "no")


def flag(default: Callable[[torch.device, dict], bool] | bool):
    """A 0/1 switch, its default a value or one made from the device and the switches read before it."""

    def read(env: str, raw: str, device: torch.device, values: dict) -> bool:
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
    kind = fp8_kind(device, choice(("auto", *FP8_KINDS), "auto")(env, raw, device, values))
    if kind == "fp8dqrow" and device.type == "cuda" and not fp8_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise SettingsError(f"{env}=fp8dqrow needs fp8 tensor cores (compute capability 8.9 or newer); this GPU "
                            f"is {major}.{minor}. Use {env}=auto or fp8wo.")
    return kind


# ----- the switches ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One optimization switch as a setting."""

    name: str  # the Settings field
    env: str  # the environment variable
    read: Callable[[str, str, torch.device, dict], Any]  # (env, raw text or "", device, switches read so far) -> value
    unset: Any  # its value in a Settings made in code without it (tests, the benchmark's engines)
    graphs: bool  # changes the compiled graphs: part of the compile-cache key
    applies: str  # what it does, where
    # what it requires of the switches read before it: a name and the value that switch must have (True: on at all);
    # unmet, it is off whatever is set (as pruna's algorithms declare what they run with)
    requires: dict[str, Any] = field(default_factory=dict)
    compare: tuple[str, ...] = ()  # values `script/benchmark gpu` measures against the default, one engine each
    # it changes compiler settings that dynamo does not guard on: a benchmark engine with it compiles afresh (dynamo
    # reset, its own inductor cache) or it would reuse the graphs compiled without it
    unguarded: bool = False

    def value(self, raw: str, device: torch.device, values: dict) -> Any:
        """Its value from the environment's text (stripped, "" when unset), given the switches read before it."""
        if not self.requirements_met(values):
            return False
        return self.read(self.env, raw, device, values)

    def requirements_met(self, values: dict) -> bool:
        return all(bool(values.get(name)) if wanted is True else values.get(name) == wanted
                   for name, wanted in self.requires.items())


SETTINGS: tuple[Setting, ...] = (
    Setting("compile", "FLUX_COMPILE", _compile_backend, None, True,
            "torch.compile backend for each transformer block (and the VAE decoder): flux/compiler.py; "
            "inductor on a GPU, off on a CPU", compare=("off",)),
    Setting("fp8", "FLUX_FP8", _fp8_kind, "fp8wo", True,
            "go_fast's fp8: auto (dynamic per-row float8 on compute capability 8.9+, weight-only fp8 elsewhere), "
            "fp8dqrow or fp8wo: flux/speed/fp8.py"),
    Setting("attention", "FLUX_ATTENTION", choice(ATTENTION_BACKENDS, "sdpa"), "sdpa", True,
            "diffusers' attention backend: sdpa, cudnn or fa3 (Hopper, where flash_attn_interface or the `kernels` "
            "package is installed; the image has neither): flux/speed set_attention", compare=("cudnn", "fa3")),
    Setting("fused_projections", "FLUX_FUSED_PROJECTIONS", flag(True), True, True,
            "q, k, v in one matmul: flux/speed/projections.py", compare=("0",)),
    Setting("compile_vae", "FLUX_COMPILE_VAE", flag(True), False, True,
            "the VAE decoder compiled too (when compiling): flux/compiler.py", requires={"compile": True},
            compare=("0",)),
    Setting("channels_last", "FLUX_CHANNELS_LAST", flag(True), True, True,
            "the VAE in channels_last memory format: flux/speed vae_channels_last", compare=("0",)),
    Setting("inductor_tuning", "FLUX_INDUCTOR_TUNING_FLAGS", flag(lambda device, v: device.type == "cuda"), False,
            True, "inductor's tuning flags of the published recipes (on a GPU, with inductor): flux/compiler.py",
            requires={"compile": "inductor"}, compare=("0",), unguarded=True),
    Setting("warmup", "FLUX_WARMUP", flag(True), False, False,
            "setup compiles every schema size on each compiled copy (when compiling): flux/engine/build.py",
            requires={"compile": True}),
)
