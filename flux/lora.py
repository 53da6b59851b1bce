"""LoRAs fused into the pipelines' weights in place and restored bit-exactly: one mechanism for every layout.

A LoRA arrives here as per-layer factors (lora_loader.py turns every layout it reads into them, key names through
diffusers' own converters): for each module a `Delta`, its weight change kept as the factors it was trained as (a
low-rank pair B @ A; a LyCORIS Kronecker or Hadamard product) times the scale its file gives it (alpha / rank, as
PEFT would scale it). `LoraManager` puts the set of LoRAs a request asks for onto every registered module ("target":
the FLUX.1-dev transformer, the schnell transformer once loaded, the CLIP text encoder):

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

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import UserError

log = logging.getLogger(__name__)

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
COMPONENTS = (TRANSFORMER, TEXT_ENCODER)
# Modules FLUX.1-dev has and FLUX.1-schnell lacks: a dev LoRA's weights for them are skipped on schnell.
OPTIONAL_MODULES = ("time_text_embed.guidance_embedder.",)
# The largest entry a fused change may reach, as a share of the weight dtype's largest number: far beyond any
# trained LoRA, and far enough inside the dtype that W + ΔW stays finite.
HEADROOM = 2.0**-8

# Each kind's factors (LyCORIS' names; "lora" is a low-rank pair, from any layout).
FACTORS = {
    "lora": ("lora_up", "lora_down"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
KIND_NAMES = {"lokr": "LoKr", "loha": "LoHa", "lora": "LoRA"}


@dataclass(frozen=True, eq=False)
class Delta:
    """One module's weight change kept as its factors: ΔW is computed when it is fused.

      lora  lora_up @ lora_down (B @ A)
      lokr  kron(w1, w2), each factor full (lokr_w1) or a product (lokr_w1_a @ lokr_w1_b)
      loha  (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)

    times `scale` (alpha / rank, as the file's layout defines it); `rows` picks the rows of that product this module
    takes, in order (one of q, k, v of a fused BFL qkv, or the final modulation with its halves swapped). Several
    Deltas may share factors. `problem()` says why a Delta cannot be fused (None: it can).
    """

    kind: str
    factors: dict[str, torch.Tensor] = field(repr=False)
    scale: float
    source: str  # the module as the file names it, for messages
    rows: tuple[tuple[int, int], ...] | None = None

    @property
    def product_shape(self) -> tuple[int, int]:
        f = self.factors
        if self.kind == "lokr":
            (a, c), (b, d) = (_factor_shape(f, "lokr_w1"), _factor_shape(f, "lokr_w2"))
            return a * b, c * d
        if self.kind == "loha":
            return f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]
        return f["lora_up"].shape[0], f["lora_down"].shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        out, inner = self.product_shape
        return (sum(stop - start for start, stop in self.rows) if self.rows else out), inner

    @property
    def rank(self) -> int:
        f = self.factors
        for name in ("lokr_w1_a", "lokr_w2_a", "hada_w1_a", "lora_down"):
            if name in f:
                return f[name].shape[0] if name == "lora_down" else f[name].shape[1]
        return 1

    def problem(self) -> str | None:
        """Why these factors cannot be fused into any layer (None when they can): not matrices of numbers, shapes
        that do not multiply, a rank of 0, values or a scale that are not finite."""
        f = self.factors
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in f.items())
        if any(not v.is_floating_point() for v in f.values()):
            kinds = ", ".join(f"{k} {str(v.dtype).removeprefix('torch.')}" for k, v in f.items())
            return f"holds factors that are not floating-point numbers ({kinds})"
        if any(v.ndim != 2 for v in f.values()):
            return f"has factors that are not matrices ({shapes})"
        if self.kind == "lokr":
            for w in ("lokr_w1", "lokr_w2"):
                if w in f:
                    continue
                if f.get(w + "_a") is None or f.get(w + "_b") is None:
                    return f"lacks {w} (or {w}_a and {w}_b)"
                if f[w + "_a"].shape[1] != f[w + "_b"].shape[0]:
                    return f"has LoKr factors that do not multiply ({shapes})"
        elif self.kind == "loha":
            missing = [n for n in FACTORS["loha"] if n not in f]
            if missing:
                return f"lacks {', '.join(missing)}"
            a1, b1, a2, b2 = (f[n] for n in FACTORS["loha"])
            if a1.shape[1] != b1.shape[0] or a2.shape[1] != b2.shape[0] or a1.shape[0] != a2.shape[0] or b1.shape[1] != b2.shape[1]:
                return f"has LoHa factors that do not multiply out to one shape ({shapes})"
        else:
            if "lora_down" not in f or "lora_up" not in f:
                return "lacks lora_down or lora_up (lora_A or lora_B)"
            if f["lora_up"].shape[1] != f["lora_down"].shape[0]:
                return f"has a low-rank pair that does not multiply ({shapes})"
        if self.rank < 1 or 0 in self.product_shape:
            return f"has rank 0 ({shapes}): it changes nothing and cannot be scaled"
        if not all(bool(torch.isfinite(v).all()) for v in f.values()):
            return "holds numbers that are not finite (NaN or infinity)"
        if not math.isfinite(self.scale):
            return f"has a scale (alpha / rank) that is not finite ({self.scale})"
        if not math.isfinite(self.bound):
            return "has numbers so large that its weight change is not finite"
        return None

    @functools.cached_property
    def bound(self) -> float:
        """An upper bound on the largest entry of scale * ΔW (Cauchy-Schwarz on each product), without forming
        ΔW: float64, cheap, and loose only by the factors' shapes."""
        f = {k: v.double() for k, v in self.factors.items()}

        def product(a: str, b: str) -> float:
            return float(f[a].norm(dim=1).max() * f[b].norm(dim=0).max())

        def part(w: str) -> float:
            return float(f[w].abs().max()) if w in f else product(w + "_a", w + "_b")

        if self.kind == "lokr":
            value = part("lokr_w1") * part("lokr_w2")
        elif self.kind == "loha":
            value = product("hada_w1_a", "hada_w1_b") * product("hada_w2_a", "hada_w2_b")
        else:
            value = product("lora_up", "lora_down")
        return value * abs(self.scale)

    def weight(self, device=None) -> torch.Tensor:
        """scale * ΔW for this module, in float32 on `device`."""
        f = {k: v.to(device, torch.float32) for k, v in self.factors.items()}
        if self.kind == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            delta = torch.kron(w1, w2)
        elif self.kind == "loha":
            delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        else:
            delta = f["lora_up"] @ f["lora_down"]
        if self.rows:
            delta = torch.cat([delta[start:stop] for start, stop in self.rows])
        return delta * self.scale if self.scale != 1 else delta


def _factor_shape(factors: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in factors:
        return tuple(factors[name].shape)
    return factors[name + "_a"].shape[0], factors[name + "_b"].shape[1]


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One LoRA, as per-layer factors on the CPU: "<component>.<module>" -> its Delta."""

    key: str  # identifies the file's content (cache key); never holds a token
    shown: str  # how logs and messages name it; never holds a token
    layout: str  # the layout the file was written in (diffusers, kohya, xlabs, lokr, ...)
    deltas: dict[str, Delta] = field(repr=False)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.deltas))

    def deltas_of(self, component: str) -> dict[str, Delta]:
        """module name -> Delta for one component."""
        prefix = component + "."
        return {k[len(prefix):]: v for k, v in self.deltas.items() if k.startswith(prefix)}

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.deltas.values()), default=0)


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
    with torch.no_grad():
        for layer, parts in plan.items():
            weight = layer.weight
            change = None
            for delta, scale in parts:
                part = delta.weight(weight.device)
                part = part * scale if scale != 1 else part
                change = part if change is None else change + part
            weight.copy_((weight.float() + change).to(weight.dtype))


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
            if delta.shape != (layer.out_features, layer.in_features):
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
