"""The optimization switches as settings: for each, its name (the Settings field), its environment variable, how
its value is read and defaulted, what it requires of the switches read before it, what it cannot run with
(`conflicts`, settled by `read` before any work), and whether it changes the compiled graphs. Settings
(flux/settings.py), the compile-cache key (flux/compile_cache.py), the test environment reset (tests/conftest.py) and
the benchmark's list of switches are made from these entries; flux/speed gives each its stage and the function that
applies it (`speed.SWITCHES`). The names follow huggingface/flux-fast's benchmark flags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .errors import SettingsError

log = logging.getLogger(__name__)

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


def _matches(value: Any, wanted: Any) -> bool:
    """A switch's value against a declared one: True means on at all (any value but an off one)."""
    return bool(value) if wanted is True else value == wanted


def shown(value: Any) -> str:
    """A value as its environment variable takes it."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


@dataclass(frozen=True)
class Conflict:
    """A switch at `value` cannot run with the switch `other` at `at` (True, for either: on at all), because `why`.
    Declared on one of the two, as pruna's algorithms declare what they are compatible with (`compatible_before`,
    `compatible_after`); here the pairs that cannot run together are named, every other pair can."""

    other: str  # the other switch's name
    why: str  # said in the error and the log line
    at: Any = True  # the other switch's value it conflicts at
    value: Any = True  # this switch's value it conflicts at


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
    # the switches it cannot run with (`read` settles them: two explicit settings are a SettingsError, a default gives
    # way to an explicit choice)
    conflicts: tuple[Conflict, ...] = ()
    off: Any = False  # its value when it is off: an unmet requirement, or a default giving way to a conflict
    compare: tuple[str, ...] = ()  # values `script/benchmark gpu` measures against the default, one engine each
    # it changes compiler settings that dynamo does not guard on: a benchmark engine with it compiles afresh (dynamo
    # reset, its own inductor cache) or it would reuse the graphs compiled without it
    unguarded: bool = False

    def value(self, raw: str, device: torch.device, values: dict) -> Any:
        """Its value from the environment's text (stripped, "" when unset), given the switches read before it."""
        if not self.requirements_met(values):
            return self.off
        return self.read(self.env, raw, device, values)

    def requirements_met(self, values: dict) -> bool:
        return all(_matches(values.get(name), wanted) for name, wanted in self.requires.items())

    def conflict(self, values: dict) -> Conflict | None:
        """The first of its conflicts that these values hold (None: none)."""
        return next((c for c in self.conflicts
                     if _matches(values.get(self.name), c.value) and _matches(values.get(c.other), c.at)), None)

    def active(self, values: dict) -> bool:
        """Whether it applies with these values: what it requires holds and nothing it conflicts with is on."""
        return self.requirements_met(values) and self.conflict(values) is None


SETTINGS: tuple[Setting, ...] = (
    Setting("compile", "FLUX_COMPILE", _compile_backend, None, True,
            "torch.compile backend for each transformer block (and the VAE decoder): flux/compiler.py; "
            "inductor on a GPU, off on a CPU", compare=("off",), off=None),
    Setting("fp8", "FLUX_FP8", _fp8_kind, "fp8wo", True,
            "go_fast's fp8: auto (dynamic per-row float8 on compute capability 8.9+, weight-only fp8 elsewhere), "
            "fp8dqrow or fp8wo: flux/speed/fp8.py", off="fp8wo"),  # weight-only: needs nothing of the GPU
    Setting("attention", "FLUX_ATTENTION", choice(ATTENTION_BACKENDS, "sdpa"), "sdpa", True,
            "diffusers' attention backend: sdpa, cudnn or fa3 (Hopper, where flash_attn_interface or the `kernels` "
            "package is installed; the image has neither): flux/speed set_attention", compare=("cudnn", "fa3"),
            off="sdpa"),
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
# No pair of these switches conflicts, so none declares a conflict. Checked (diffusers 0.42, torchao 0.16): the
# attention backends (cudnn, fa3) take the bf16 q, k, v that fp8dqrow's torchao linears give back (pruna's
# flash_attn3 lists torchao among what it runs after), and fused projections keep the attention processor the
# backend was set on (diffusers' fuse_projections swaps no processor); flux-fast's published recipe runs fused
# projections, FlashAttention-3, dynamic float8, channels_last, torch.compile and the inductor flags together.
# channels_last without a compiled VAE decoder runs (cuDNN's NHWC convolutions), only its gain differs. The switches
# that need another (compile_vae, inductor_tuning, warmup) say so in `requires`.


def read(env: Mapping[str, str], device: torch.device, settings: tuple[Setting, ...] = SETTINGS) -> dict[str, Any]:
    """Every switch's value from the environment (its variable unset or empty: its default), in order: a default or a
    requirement may follow a switch read before it. Then the conflicts are settled, before any work: two settings
    made explicitly that conflict are a SettingsError naming both and what to set instead; a default that conflicts
    with an explicit choice gives way (its `off` value), with a log line; two defaults that conflict, the one that
    declares the conflict gives way. What a switch turned off required goes off with it."""
    by_name = {s.name: s for s in settings}
    _check_declared(settings, by_name)
    raw = {s.name: (env.get(s.env) or "").strip() for s in settings}
    values: dict[str, Any] = {}
    for switch in settings:
        values[switch.name] = switch.value(raw[switch.name], device, values)
    for switch in settings:
        while (found := switch.conflict(values)) is not None:
            other = by_name[found.other]
            if raw[switch.name] and raw[other.name]:
                raise SettingsError(conflict_message(switch, other, found, values))
            gives, keeps = (other, switch) if raw[switch.name] else (switch, other)
            log.info("settings: %s is %s by default, which cannot run with %s=%s (%s): %s=%s instead", gives.env,
                     shown(values[gives.name]), keeps.env, shown(values[keeps.name]), found.why, gives.env,
                     shown(gives.off))
            values[gives.name] = gives.off
    for switch in settings:
        if not switch.requirements_met(values):
            values[switch.name] = switch.off
    return values


def conflict_message(switch: Setting, other: Setting, conflict: Conflict, values: dict) -> str:
    return (f"{switch.env}={shown(values[switch.name])} cannot run with {other.env}={shown(values[other.name])}: "
            f"{conflict.why}. Set {switch.env}={shown(switch.off)} or {other.env}={shown(other.off)}, or unset one "
            "of them.")


def _check_declared(settings: tuple[Setting, ...], by_name: dict[str, Setting]) -> None:
    """Each conflict names a switch, and the value either side gives way to settles it."""
    for switch in settings:
        for c in switch.conflicts:
            if c.other not in by_name:
                raise ValueError(f"{switch.name} conflicts with {c.other}, which is not a switch")
            if _matches(switch.off, c.value) or _matches(by_name[c.other].off, c.at):
                raise ValueError(f"{switch.name}'s conflict with {c.other}: an off value would still conflict")


_check_declared(SETTINGS, {s.name: s for s in SETTINGS})
