"""LoRAs fused into the pipelines' weights in place and restored bit-exactly: one mechanism for every layout.

A LoRA arrives here as per-layer factors (flux/lora/formats.py turns every layout it reads into them, key names
through diffusers' own converters): for each module a `Delta`, its weight change kept as the factors it was trained as (a
low-rank pair B @ A; a LyCORIS Kronecker or Hadamard product) times the scale its file gives it (alpha / rank, as
PEFT would scale it). `LoraManager` puts the set of LoRAs a request asks for onto every registered module ("target":
each FLUX variant's bf16 transformer once loaded, the CLIP text encoder):

  1. check    before any weight changes: every Delta's layer exists and is a Linear of the Delta's shape, and the
              largest entry the change can reach stays far inside the weight's dtype (so a fused weight is finite)
  2. restore  every weight the previous LoRAs changed is copied back from an exact copy kept on the CPU
  3. keep     the first time a LoRA touches a weight, an exact copy of it is kept (once; originals never change)
  4. fuse     W += sum over the LoRAs of scale * ΔW, computed in float32 on W's device and rounded once into W's
              dtype, in place (the same tensor: the module tree, shapes, dtypes and flags never change)

So a prediction runs on plain modules (no per-step LoRA cost), switching back to no LoRA gives bit-identical weights
(no drift from repeated fuse/unfuse), and a scale change is a restore plus a fuse from the factors kept in memory.
No library machinery touches the serving model: PEFT's injection would let a file's adapter metadata configure it
(modules_to_save wraps modules, r and target_modules decide what is injected) and its unload does not undo all of it.
A Kronecker or Hadamard ΔW of a fused BFL qkv/linear1 is split by rows into q/k/v/mlp (`rows`).

A failure while fusing (a GPU out of memory) restores the target's originals and puts the previous LoRAs back, so
the predictor is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import UserError
from .delta import KIND_NAMES, TEXT_ENCODER, TRANSFORMER, Delta, LoraWeights

log = logging.getLogger(__name__)

# Modules a guidance-distilled variant has and the others lack (flux/variants.py: guidance): a LoRA's weights for
# them are skipped on a variant without them.
OPTIONAL_MODULES = ("time_text_embed.guidance_embedder.",)
WIDER_INPUTS = ("x_embedder",)  # modules whose input is wider on some variants (flux/variants.py: fill_channels)
# The largest entry a fused change may reach, as a share of the weight dtype's largest number: far beyond any
# trained LoRA, and far enough inside the dtype that W + ΔW stays finite.
HEADROOM = 2.0**-8


@dataclass(frozen=True)
class Adapter:
    weights: LoraWeights
    scale: float


def _state(adapters: Sequence[Adapter]) -> tuple:
    return tuple((a.weights.key, float(a.scale)) for a in adapters)


def _text_encoder_module(root, name: str):
    # LoRAs name CLIP layers `text_model.encoder...`; recent transformers flatten CLIPTextModel to `encoder...`.
    for candidate in (name, name.removeprefix("text_model.")):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _transformer_module(root, name: str):
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


_FIND = {TRANSFORMER: _transformer_module, TEXT_ENCODER: _text_encoder_module}


@dataclass
class _Kept:
    param: torch.Tensor  # the live parameter
    original: torch.Tensor  # its exact copy, on the CPU


@dataclass
class _Target:
    name: str
    module: torch.nn.Module
    component: str
    applied: tuple[Adapter, ...] = ()
    touched: dict[int, _Kept] = field(default_factory=dict)  # weights that differ from their originals now


# One fuse: each layer with the (Delta, LoRA scale) pairs that change it.
_Plan = dict[torch.nn.Linear, list[tuple[Delta, float]]]


class LoraManager:
    """The LoRA state of every registered module; `use()` makes it match a request."""

    def __init__(self):
        self._targets: dict[str, _Target] = {}
        self._kept: dict[int, _Kept] = {}  # id(param) -> original, for every weight a LoRA ever touched
        self._lock = threading.RLock()

    # ----- targets ---------------------------------------------------------------------------------------------

    def register(self, name: str, module: torch.nn.Module, component: str) -> None:
        """Add a module that LoRAs apply to (component: "transformer" or "text_encoder").

        It starts with no LoRA; `use()` brings it up to date the first time a request uses it. It is frozen
        (requires_grad off) here, so the parameter flags torch.compile guards on never change.
        """
        if component not in _FIND:
            raise ValueError(f"unknown component {component!r}")
        with self._lock:
            if name in self._targets:
                raise ValueError(f"a LoRA target named {name!r} is already registered")
            module.requires_grad_(False)
            self._targets[name] = _Target(name, module, component)

    def unregister(self, name: str) -> None:
        """Forget a target whose module is being dropped (a variant loaded on first use, flux/engine): its LoRA state
        and the originals kept of its weights go with it; nothing is restored."""
        with self._lock:
            target = self._targets.pop(name, None)
            if target is None:
                return
            for param in target.module.parameters():
                self._kept.pop(id(param), None)

    def adapters(self, name: str) -> tuple[Adapter, ...]:
        """The LoRAs fused into a target now (none for a target not registered yet)."""
        target = self._targets.get(name)
        return target.applied if target else ()

    def state(self, name: str) -> tuple:
        """The target's LoRA state as (key, scale) pairs: equal states carry the same weights."""
        return _state(self.adapters(name))

    def touched(self, name: str) -> set[int]:
        """ids of the target's parameters that differ from their originals now (what its LoRAs changed)."""
        target = self._targets.get(name)
        return set(target.touched) if target else set()

    # ----- the one operation -----------------------------------------------------------------------------------

    def use(self, adapters: Sequence[Adapter], targets: Sequence[str]) -> bool:
        """Make these targets carry exactly these LoRAs at these scales. Returns whether anything changed.

        The same LoRAs and scales again cost nothing. A LoRA that does not fit is refused before any weight changes;
        on any other failure every target is left as it was.
        """
        adapters = tuple(a for a in adapters if a.scale != 0)  # scale 0 is the model without that LoRA
        with self._lock:
            chosen = [self._targets[n] for n in targets]
            stale = [t for t in chosen if _state(t.applied) != _state(adapters)]
            if not stale:
                return False
            plans = {t.name: _plan(t, adapters) for t in stale}  # refuses what does not fit, before any change
            started = time.monotonic()
            done: list[tuple[_Target, tuple[Adapter, ...]]] = []
            try:
                for target in stale:
                    previous = target.applied
                    self._apply(target, adapters, plans[target.name])
                    done.append((target, previous))
            except BaseException:
                for target, previous in done:  # put back what this call already changed
                    self._apply(target, previous, _plan(target, previous))
                raise
            log.info(
                "lora: %s on %s in %.2fs",
                " + ".join(f"{a.weights.shown} x{a.scale:g}" for a in adapters) or "no LoRA",
                ", ".join(t.name for t in stale), time.monotonic() - started,
            )
            return True

    # ----- one target ------------------------------------------------------------------------------------------

    def _apply(self, target: _Target, adapters: tuple[Adapter, ...], plan: _Plan) -> None:
        previous = target.applied
        try:
            self._restore(target)
            target.touched = self._keep(plan)
            _fuse(plan)
            target.applied = adapters
        except BaseException:
            self._restore(target)
            target.applied = ()
            if previous:
                log.warning("lora: applying to %s failed; putting the previous LoRAs back", target.name)
                self._apply(target, previous, _plan(target, previous))
            raise

    def _keep(self, plan: _Plan) -> dict[int, _Kept]:
        """The weights this plan changes; an exact CPU copy of each is kept the first time."""
        touched: dict[int, _Kept] = {}
        for layer in plan:
            p = layer.weight
            kept = self._kept.get(id(p))
            if kept is None or kept.param is not p:
                kept = self._kept[id(p)] = _Kept(p, _cpu_copy(p))
            touched[id(p)] = kept
        return touched

    def _restore(self, target: _Target) -> None:
        if not target.touched:
            return
        with torch.no_grad():
            for kept in target.touched.values():
                kept.param.copy_(kept.original, non_blocking=True)
        if any(k.param.is_cuda for k in target.touched.values()):
            torch.cuda.synchronize()
        target.touched = {}


def _cpu_copy(param: torch.Tensor) -> torch.Tensor:
    # Pinned memory makes restoring (host -> GPU) several times faster.
    copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=param.is_cuda)
    with torch.no_grad():
        copy.copy_(param.detach())
    return copy


def _fuse(plan: _Plan) -> None:
    """W += sum of scale * ΔW in place (the same tensor), computed in float32 on W's device and rounded once."""
    whole: dict[tuple, torch.Tensor] = {}  # shared products in use: a fused module's layers follow one another
    with torch.no_grad():
        for layer, parts in plan.items():
            weight = layer.weight
            keys = {(id(d.factors), d.scale, weight.device) for d, _ in parts if d.rows}
            for gone in whole.keys() - keys:  # one product per adapter of this fused module is held, no more
                del whole[gone]
            change = None
            for delta, scale in parts:
                if delta.rows:  # q, k, v of a fused BFL module take rows of one product: computed once for them all
                    key = (id(delta.factors), delta.scale, weight.device)
                    if key not in whole:
                        whole[key] = dataclasses.replace(delta, rows=None).weight(weight.device)
                    part = delta.pick(whole[key])
                else:
                    part = delta.weight(weight.device)
                part = part * scale if scale != 1 else part
                if part.shape[1] < weight.shape[1]:  # a wider input (`_widens`): its first columns change
                    part = torch.nn.functional.pad(part, (0, weight.shape[1] - part.shape[1]))
                change = part if change is None else change + part
            weight.copy_((weight.float() + change).to(weight.dtype))


def _widens(name: str, delta, layer: torch.nn.Linear) -> bool:
    """A LoRA made for dev's input embedder on a variant whose transformer reads more input channels (FLUX.1-Fill:
    the masked image's latents and the mask after the noise's): it changes the noise's columns, the first ones, and
    leaves the others (as diffusers pads lora_A with zeros for such a module, `_maybe_expand_lora_state_dict`)."""
    out, inner = delta.shape
    return name in WIDER_INPUTS and out == layer.out_features and inner < layer.in_features


def _plan(target: _Target, adapters: Sequence[Adapter]) -> _Plan:
    """Each layer of the target the adapters change, with their Deltas and scales; refuses (UserError) a LoRA whose
    modules the target lacks, whose shapes differ, or whose change would leave the dtype's range."""
    find = _FIND[target.component]
    plan: _Plan = {}
    for adapter in adapters:
        weights = adapter.weights
        missing, wrong = [], []
        for name, delta in weights.deltas_of(target.component).items():
            layer = find(target.module, name)
            if layer is None and name.startswith(OPTIONAL_MODULES):
                log.info("lora: %s: %s is not in %s; skipped there", weights.shown, name, target.name)
                continue
            if not isinstance(layer, torch.nn.Linear):
                missing.append(name)
                continue
            if delta.shape != (layer.out_features, layer.in_features) and not _widens(name, delta, layer):
                (out, inner), kind = delta.shape, KIND_NAMES[delta.kind]
                wrong.append(f"{name} is {layer.in_features}->{layer.out_features} here, the {kind}'s "
                             f"({delta.source}) is {inner}->{out}")
                continue
            plan.setdefault(layer, []).append((delta, float(adapter.scale)))
        if wrong:
            raise UserError(
                f"{weights.shown} was made for a different model (e.g. SDXL, or FLUX at another size): "
                f"{'; '.join(wrong[:2])}{' ...' if len(wrong) > 2 else ''}. Use a LoRA trained for FLUX.1-dev."
            )
        if missing:
            raise UserError(
                f"{weights.shown} has weights for modules FLUX.1's {target.component.replace('_', ' ')} does not "
                f"have ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): it was made for a different model."
            )
    for layer, parts in plan.items():
        limit = torch.finfo(layer.weight.dtype).max * HEADROOM
        if sum(delta.bound * abs(scale) for delta, scale in parts) > limit:
            delta, scale = max(parts, key=lambda p: p[0].bound * abs(p[1]))
            shown = next(a.weights.shown for a in adapters if delta in a.weights.deltas.values())
            raise UserError(
                f"{shown} changes {delta.source} by numbers too large for the model's "
                f"{str(layer.weight.dtype).removeprefix('torch.')} weights "
                f"at scale {scale:g} (its alpha or its weights are far beyond a trained LoRA's): lower the scale, or "
                "use another LoRA."
            )
    return plan


@dataclass
class Fp8Twin:
    """go_fast's fp8 copy of a variant's transformer, kept in step with the bf16 one's LoRAs: `sync` (flux/speed/fp8.py:
    Fp8Sync) re-quantizes layers from the bf16 weights; `lora` is the LoRA state quantized into the copy (None:
    unknown, sync again) and `touched` the bf16 weights whose LoRA change it carries."""

    sync: object  # flux.speed.fp8.Fp8Sync
    lora: tuple | None = ()
    touched: set[int] = field(default_factory=set)

    def follow(self, loras: LoraManager, target: str) -> int | None:
        """Bring the copy to the target's LoRA state: re-quantize the layers that either state touches. Returns how
        many were, or None when it already matched."""
        state = loras.state(target)
        if state == self.lora:
            return None
        touched = loras.touched(target)
        self.lora = None  # until the sync completes
        count = self.sync.sync(self.touched | touched)
        self.touched, self.lora = touched, state
        return count
