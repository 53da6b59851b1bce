"""LoRA adapters on the pipelines' modules: fused into the weights, restored bit-exactly.

A LoRA arrives here already normalized by lora_loader.py: diffusers/PEFT keys
(`transformer.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, ...)
with its alphas or adapter config. `LoraManager` puts the set of LoRAs a request
asks for onto every registered module ("target": the FLUX.1-dev transformer, the
schnell transformer when it is loaded, the CLIP text encoder, any other copy
registered later), using diffusers and PEFT for every step:

  1. inject   `FluxPipeline.load_lora_into_transformer` (PEFT layers, unfused); for CLIP, the same LoraConfig
              through PEFT's `inject_adapter_in_model` (see _inject_text_encoder for why not diffusers' call)
  2. restore  every weight the previous LoRAs changed is copied back from an exact copy kept on the CPU
  3. keep     the first time a LoRA touches a weight, an exact copy of it is kept (once; originals never change)
  4. fuse     `set_adapters` with the scales, then `fuse_lora`: W += scale * B @ A, in place, in W's dtype
  5. remove   `unload_lora`: the PEFT layers go, the fused weights stay

So a prediction runs on plain modules (no per-step LoRA cost, the same module tree
and the same parameter tensors as without a LoRA: weights change in place, same
shapes, same dtypes), switching back to no LoRA gives bit-identical weights (no
drift from repeated fuse/unfuse), and a scale change is a restore plus a fuse from
the LoRA kept in memory (no download, no file read).

LyCORIS LoKr and LoHa modules (and the plain LoRA pairs such a file mixes in)
arrive as `Delta`s: their factors, turned into ΔW per layer at fuse time and added
in place to the weight after step 4, with the same keep/restore (steps 2-3), so
they restore exactly and the fp8 twin is re-quantized from them like any LoRA.
PEFT is not used for them: a Kronecker or Hadamard ΔW of a fused BFL qkv/linear1
is split by rows into q/k/v/mlp, and the parts are no longer Kronecker or
Hadamard products PEFT's LoKr/LoHa layers can hold; nor do PEFT's layers take
factor shapes other than those of their own factorization of each target.

A failure while injecting leaves the weights untouched (nothing is fused before
every adapter is in); a failure later restores the target's originals and puts
the previous LoRAs back, so the predictor is left exactly as it was.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import UserError

log = logging.getLogger(__name__)

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
COMPONENTS = (TRANSFORMER, TEXT_ENCODER)
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
# Modules FLUX.1-dev has and FLUX.1-schnell lacks: a dev LoRA's weights for them are skipped on schnell.
OPTIONAL_MODULES = ("time_text_embed.guidance_embedder.",)


@dataclass(frozen=True, eq=False)
class Delta:
    """One module's weight change kept as its factors (LyCORIS' conventions): ΔW is computed when it is fused.

      lokr  kron(w1, w2), each factor full (lokr_w1) or a product (lokr_w1_a @ lokr_w1_b)
      loha  (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)
      lora  lora_up @ lora_down (a plain LoRA pair in a LyCORIS file)

    times `scale` (alpha / rank); `rows` picks the rows of that product this module takes, in order (one of q, k,
    v of a fused BFL qkv, or the final modulation with its halves swapped). Several Deltas may share factors.
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


_KINDS = {"lokr": "LoKr", "loha": "LoHa", "lora": "LoRA"}


def _factor_shape(factors: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in factors:
        return tuple(factors[name].shape)
    return factors[name + "_a"].shape[0], factors[name + "_b"].shape[1]


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One LoRA, normalized: diffusers/PEFT keys prefixed by the component they apply to, on the CPU."""

    key: str  # identifies the file's content (cache key); never holds a token
    shown: str  # how logs and messages name it; never holds a token
    layout: str  # the layout the file was written in (diffusers, kohya, xlabs, ...)
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    network_alphas: dict[str, float] | None = field(default=None, repr=False)
    metadata: dict | None = field(default=None, repr=False)  # diffusers' adapter config from the file header
    deltas: dict[str, Delta] = field(default_factory=dict, repr=False)  # "<component>.<module>" -> its Delta

    def part(self, component: str) -> dict[str, torch.Tensor]:
        prefix = component + "."
        return {k: v for k, v in self.state_dict.items() if k.startswith(prefix)}

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k.startswith(c + ".") for k in (*self.state_dict, *self.deltas)))

    def deltas_of(self, component: str) -> dict[str, Delta]:
        """module name -> Delta for one component."""
        prefix = component + "."
        return {k[len(prefix):]: v for k, v in self.deltas.items() if k.startswith(prefix)}

    def modules(self, component: str) -> dict[str, dict[str, torch.Tensor]]:
        """module name -> {suffix: tensor} for one component."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.part(component).items():
            rest = key[len(component) + 1:]
            suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
            if suffix is None:
                raise UserError(f"{self.shown} holds a key this loader cannot apply: {key!r}.")
            out.setdefault(rest[: -len(suffix)], {})[suffix] = value
        return out

    @property
    def rank(self) -> int:
        return max([v.shape[0] for k, v in self.state_dict.items() if k.endswith(".lora_A.weight")]
                   + [d.rank for d in self.deltas.values()], default=0)


@dataclass(frozen=True)
class Adapter:
    weights: LoraWeights
    scale: float


def _state(adapters: Sequence[Adapter]) -> tuple:
    return tuple((a.weights.key, float(a.scale)) for a in adapters)


# ----- what each component needs from diffusers -----------------------------------------------------------------------

def _inject_transformer(module, weights: LoraWeights, name: str, sd: dict) -> None:
    from diffusers import FluxPipeline

    FluxPipeline.load_lora_into_transformer(
        sd, network_alphas=weights.network_alphas or None, transformer=module, adapter_name=name,
        metadata=weights.metadata, low_cpu_mem_usage=True,
    )


def _inject_text_encoder(module, weights: LoraWeights, name: str, sd: dict) -> None:
    """diffusers' load_lora_into_text_encoder, with PEFT's own injection in place of transformers' load_adapter.

    transformers 5.23's load_adapter needs peft >= 0.20 (peft.utils.transformers_weight_conversion) and
    requirements.txt pins peft 0.18.1, so diffusers' path fails here; this is the same LoraConfig (diffusers'
    get_peft_kwargs or the file's adapter metadata) injected the way diffusers injects into its own models.
    With peft >= 0.20 this can become FluxPipeline.load_lora_into_text_encoder again.
    """
    from diffusers.utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    def strip(d: dict) -> dict:
        return {k[len(TEXT_ENCODER) + 1:]: v for k, v in (d or {}).items() if k.startswith(TEXT_ENCODER + ".")}

    sd = strip(sd)
    if not hasattr(module, "text_model"):  # recent transformers flatten CLIPTextModel; LoRAs still say text_model.
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    metadata = strip(weights.metadata)
    if not metadata:
        rank = {k: v.shape[1] for k, v in sd.items() if k.endswith("lora_B.weight")}
        metadata = get_peft_kwargs(rank, strip(weights.network_alphas), sd, is_unet=False)
    inject_adapter_in_model(LoraConfig(**metadata), module, adapter_name=name, low_cpu_mem_usage=True, state_dict=sd)
    result = set_peft_model_state_dict(module, sd, adapter_name=name, low_cpu_mem_usage=True)
    unexpected = [k for k in getattr(result, "unexpected_keys", None) or () if "lora_" in k]
    if unexpected:
        raise UserError(f"{weights.shown}: CLIP has no place for {', '.join(unexpected[:3])}.")


def _fuse_transformer(module, names: list[str], scales: list[float]) -> None:
    module.set_adapters(names, scales)
    module.fuse_lora(lora_scale=1.0, adapter_names=names)


def _fuse_text_encoder(module, names: list[str], scales: list[float]) -> None:
    from diffusers.loaders.lora_base import fuse_text_encoder_lora, set_adapters_for_text_encoder

    set_adapters_for_text_encoder(names, module, scales)
    fuse_text_encoder_lora(module, lora_scale=1.0, adapter_names=names)


def _remove_from_text_encoder(module) -> None:
    # What FluxPipeline.unload_lora_weights() does for a text encoder (diffusers keeps it module-private).
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch

    _remove_text_encoder_monkey_patch(module)


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


@dataclass(frozen=True)
class _Component:
    inject: Callable
    fuse: Callable
    remove: Callable
    find: Callable


_COMPONENTS = {
    TRANSFORMER: _Component(_inject_transformer, _fuse_transformer, lambda m: m.unload_lora(), _transformer_module),
    TEXT_ENCODER: _Component(_inject_text_encoder, _fuse_text_encoder, _remove_from_text_encoder, _text_encoder_module),
}


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
        (requires_grad off) here: PEFT freezes every base weight it injects into, and a module frozen from the
        start keeps the same parameter flags through any number of LoRAs (torch.compile guards on them).
        """
        if component not in _COMPONENTS:
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

        The same LoRAs and scales again cost nothing. On failure every target is left as it was.
        """
        adapters = tuple(a for a in adapters if a.scale != 0)  # scale 0 is the model without that LoRA
        with self._lock:
            chosen = [self._targets[n] for n in targets]
            stale = [t for t in chosen if _state(t.applied) != _state(adapters)]
            if not stale:
                return False
            for adapter in adapters:  # refuse a LoRA that does not fit before changing anything
                for component in adapter.weights.components:
                    for target in (t for t in stale if t.component == component):
                        _check_fits(adapter.weights, target)
            started = time.monotonic()
            done: list[tuple[_Target, tuple[Adapter, ...]]] = []
            try:
                for target in stale:
                    previous = target.applied
                    self._apply(target, adapters)
                    done.append((target, previous))
            except BaseException:
                for target, previous in done:  # put back what this call already changed
                    self._apply(target, previous)
                raise
            log.info(
                "lora: %s on %s in %.2fs",
                " + ".join(f"{a.weights.shown} x{a.scale:g}" for a in adapters) or "no LoRA",
                ", ".join(t.name for t in stale), time.monotonic() - started,
            )
            return True

    # ----- one target ------------------------------------------------------------------------------------------

    def _apply(self, target: _Target, adapters: tuple[Adapter, ...]) -> None:
        component = _COMPONENTS[target.component]
        names: list[str] = []
        scales: list[float] = []
        deltas: list[tuple[dict[str, torch.nn.Linear], dict[str, Delta], float]] = []  # (layers, Deltas, scale)
        try:
            param = next(target.module.parameters())
            for i, adapter in enumerate(adapters):
                part = _part_for(adapter.weights, target)
                if part:  # the LoRA on the target's device and dtype (it is small; the kept copy stays on the CPU)
                    sd = {k: v.to(param.device, param.dtype) for k, v in part.items()}
                    with warnings.catch_warnings():  # PEFT warns whenever a second adapter joins: intended here
                        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                        component.inject(target.module, adapter.weights, f"lora_{i}", sd)
                    names.append(f"lora_{i}")
                    scales.append(float(adapter.scale))
                own = _deltas_for(adapter.weights, target)
                if own:
                    layers = {name: component.find(target.module, name) for name in own}
                    deltas.append((layers, own, float(adapter.scale)))
        except BaseException:
            component.remove(target.module)  # nothing was fused: the weights are as they were
            raise
        previous = target.applied
        try:
            self._restore(target)
            if names or deltas:
                target.touched = self._keep(target.module, names, [l for layers, _, _ in deltas for l in layers.values()])
            if names:
                component.fuse(target.module, names, scales)
            for layers, own, scale in deltas:  # after PEFT's fuse: W += scale * ΔW, rounded once into W's dtype
                _add(layers, own, scale)
            target.applied = adapters
        except BaseException:
            self._restore(target)
            target.applied = ()
            component.remove(target.module)
            if previous:
                log.warning("lora: applying to %s failed; putting the previous LoRAs back", target.name)
                self._apply(target, previous)
            raise
        component.remove(target.module)

    def _keep(self, module: torch.nn.Module, names: list[str], layers: Sequence[torch.nn.Linear] = ()) -> dict[int, _Kept]:
        """The weights the injected adapters (and the Deltas of these layers) will change; an exact CPU copy of each is
        kept the first time."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        touched: dict[int, _Kept] = {}
        changed: list[torch.Tensor] = [layer.weight for layer in layers]
        for layer in module.modules():
            if not names or not isinstance(layer, BaseTunerLayer) or not any(n in layer.lora_A for n in names):
                continue
            base = layer.get_base_layer()
            changed.append(base.weight)
            if base.bias is not None and any(getattr(layer, "lora_bias", {}).get(n) for n in names):
                changed.append(base.bias)
        for p in changed:
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


def _add(layers: dict[str, torch.nn.Linear], deltas: dict[str, Delta], scale: float) -> None:
    """W += scale * ΔW in place (the same tensor), computed in float32 on W's device and rounded once."""
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = layers[name].weight
            change = delta.weight(weight.device)
            weight.copy_((weight.float() + (change * scale if scale != 1 else change)).to(weight.dtype))


def _deltas_for(weights: LoraWeights, target: _Target) -> dict[str, Delta]:
    """The LoRA's Deltas for this target's component, less those of optional modules the target lacks."""
    find = _COMPONENTS[target.component].find
    return {name: d for name, d in weights.deltas_of(target.component).items()
            if not (name.startswith(OPTIONAL_MODULES) and find(target.module, name) is None)}


def _part_for(weights: LoraWeights, target: _Target) -> dict[str, torch.Tensor]:
    """The LoRA's tensors for this target's component, less those of optional modules the target lacks."""
    find = _COMPONENTS[target.component].find
    absent = {name for name in weights.modules(target.component)
              if name.startswith(OPTIONAL_MODULES) and find(target.module, name) is None}
    prefix = target.component + "."
    return {k: v for k, v in weights.part(target.component).items()
            if not any(k.startswith(f"{prefix}{name}.") for name in absent)}


def _check_fits(weights: LoraWeights, target: _Target) -> None:
    find = _COMPONENTS[target.component].find
    missing, wrong = [], []
    def linear(name: str) -> torch.nn.Linear | None:
        """The target's Linear the LoRA names (None: an optional module it lacks, or missing: noted)."""
        module = find(target.module, name)
        if module is None and name.startswith(OPTIONAL_MODULES):
            log.info("lora: %s: %s is not in %s; skipped there", weights.shown, name, target.name)
            return None
        if not isinstance(module, torch.nn.Linear):
            missing.append(name)
            return None
        return module

    for name, tensors in weights.modules(target.component).items():
        if (module := linear(name)) is None:
            continue
        a, b = tensors.get(".lora_A.weight"), tensors.get(".lora_B.weight")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{weights.shown} is not a valid LoRA: {target.component}.{name} lacks a matching lora_A/lora_B pair.")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            wrong.append(f"{name} is {module.in_features}->{module.out_features} here, "
                         f"the LoRA's is {a.shape[1]}->{b.shape[0]}")
    for name, delta in weights.deltas_of(target.component).items():
        if (module := linear(name)) is None:
            continue
        if delta.shape != (module.out_features, module.in_features):
            out, inner = delta.shape
            raise UserError(
                f"{weights.shown}: the {_KINDS[delta.kind]} factors of {delta.source} multiply out to a {out}x{inner} "
                f"change, but {target.component}.{name} is {module.out_features}x{module.in_features} here: it was made "
                "for a different model, or is damaged. Use a LoRA trained for FLUX.1-dev."
            )
    if wrong:
        raise UserError(
            f"{weights.shown} was made for a different model (e.g. SDXL, or FLUX at another size): "
            f"{'; '.join(wrong[:2])}{' ...' if len(wrong) > 2 else ''}. Use a LoRA trained for FLUX.1-dev."
        )
    if missing:
        raise UserError(
            f"{weights.shown} has weights for modules FLUX.1's {target.component.replace('_', ' ')} does not have "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): it was made for a different model."
        )
