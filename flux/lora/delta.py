"""A LoRA as per-layer factors: a `Delta` per module (its factors, scale and the maths of ΔW), `LoraWeights` per file.

A `Delta` keeps a module's weight change as the factors it was trained as (a low-rank pair B @ A; a LyCORIS
Kronecker or Hadamard product) and the scale its file gives it (alpha / rank, as PEFT would scale it); `problem()`
says why one cannot be fused (not matrices of finite numbers that multiply out, rank 0, a scale that is not finite).
Every layout (flux/lora/layouts.py) ends as these; flux/lora/fuse.py adds their ΔW to the serving weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
COMPONENTS = (TRANSFORMER, TEXT_ENCODER)

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
        return self.pick(delta * self.scale if self.scale != 1 else delta)

    def pick(self, whole: torch.Tensor) -> torch.Tensor:
        """This module's rows of its factors' whole (scaled) product; the whole product where it takes it all."""
        return torch.cat([whole[start:stop] for start, stop in self.rows]) if self.rows else whole


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
    unapplied: int = 0  # tensors this loader does not apply (T5, bias/norm differences): named in the log

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
