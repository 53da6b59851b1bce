"""The transformers: each FLUX variant's bf16 transformer and go_fast's fp8 copy of it, each in a pipeline for every
task, smashed by pruna with the step caches and compiled (a `Copy`); placed by the memory plan; kept in step with
the LoRAs.

The base variant's copies are built by setup; another variant's on its first request, sharing the base's text
encoders and VAE (flux/variants.py). A copy is named by its variant, "-fp8" for go_fast's: "dev", "dev-fp8", ...
Where the plan keeps a variant's bf16 transformer off the GPU, its requests run the fp8 copy (`route`). LoRAs are
fused into the bf16 weights (flux/lora); each fp8 copy is re-quantized from the bf16 layers a LoRA change touched
(`sync_fp8`), in place, so compiled graphs stay valid.

CPU memory: the variants loaded on first use share what the base leaves of the settings' `host_memory`, as
flux/hostmemory.py accounts for it (`host`). Before one is read from disk, and before one of its transformers is
moved out of the GPU (`use`, `make_room`), the engine asks it what must go: the least recently used of the others
(or that one) where it would not fit. What goes is dropped here (`drop`): its copies, its pipelines and its LoRA
state are forgotten, and its next request reads it again (from the disk: its weights stay there) with the LoRAs
that request asks for, as on its first.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from .. import compiler, memory, speed, variants, weights
from ..budget import SetupBudget
from ..hostmemory import HostMemory
from ..lora.formats import TRANSFORMER
from ..lora.fuse import Fp8Twin, LoraManager
from ..request import Request
from ..settings import Settings
from ..speed import projections, step_cache
from ..variants import Variant
from ..residency import Move, Residency

log = logging.getLogger(__name__)


class Copy:
    """One transformer (bf16 or fp8) in a pipeline for each task, smashed by pruna, run with a speed mode; its
    compiled regions fall back to eager on a compile error."""

    def __init__(self, name: str, smashed, caches: dict[str, step_cache.StepCache], pipelines: dict[str, object]):
        from pruna import PrunaModel

        self.name = name
        self.caches = caches
        self.transformer = smashed.model.transformer
        # Every task's pipeline called through pruna's wrapper, like the smashed one.
        self.models = {task: smashed if pipe is smashed.model else PrunaModel(pipe, smashed.smash_config)
                       for task, pipe in pipelines.items()}
        self.compiled: list[compiler.Compiled] = []  # its blocks, and the VAE decoder it shares with other copies

    def pipeline(self, task: str):
        """The plain diffusers pipeline of a task (every task's shares this copy's transformer)."""
        return self.models[task].model

    def run(self, task: str, mode: speed.Mode, passes_per_step: int = 1, around=None, **kwargs) -> tuple[object, int]:
        """The pipeline's output, and how many denoising steps the mode's step cache served (0 with mode Off).
        passes_per_step: transformer calls per denoising step (2 with true classifier-free guidance), cached apart;
        around: (transformer, call) -> the call's output, run inside the step cache (flux/engine/guidance.py)."""
        try:
            return self._run(task, mode, passes_per_step, around, **kwargs)
        except Exception as exc:
            if not self.fall_back(exc):
                raise
            return self._run(task, mode, passes_per_step, around, **kwargs)

    def fall_back(self, exc: BaseException) -> bool:
        """After a compile error: make the failing compiled region eager again, loudly. False: not a compile error."""
        region = getattr(exc, "flux_region", None)
        failing = [c for c in self.compiled if c.regions and (region is None or region in c.kinds)]
        if not failing or not compiler.is_compile_error(exc):
            return False
        for compiled in failing:
            compiled.revert()
        cause = getattr(exc, "inner_exception", None) or exc  # dynamo wraps a backend's error
        detail = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
        log.error("=" * 78 + "\nCOMPILE FAILED on the %s path (%s): %s: %s\nIt runs eager from now on: slower, same "
                  "results.\n" + "=" * 78, self.name, region or "compiled regions", type(cause).__name__, detail)
        return True

    def _run(self, task: str, mode: speed.Mode, passes_per_step: int, around, **kwargs):
        model = self.models[task]
        call = (lambda: model(**kwargs)) if around is None else (lambda: around(self.transformer, lambda: model(**kwargs)))
        if not mode.caches:
            return call(), 0
        return self.caches[mode.cache].run(call, model.model, mode.params, passes_per_step)


class Transformers:
    """Every copy this engine runs, by name, built as needed and placed by the memory plan (`residency`)."""

    def __init__(self, base, settings: Settings, device: torch.device, dtype: torch.dtype, plan: memory.Plan | None,
                 loras: LoraManager, sources: dict[str, str], stages, vae_compiled: compiler.Compiled | None,
                 budget: SetupBudget | None = None):
        """base: the base variant's loaded pipeline (its transformer already prepared: `prepare`); sources: every
        variant's weights (flux/weights.py), read for the variants loaded on first use; budget: setup's time budget
        (None: unbounded), which may defer the base variant's fp8 copy to the first request that needs it."""
        self.base = base
        self.settings, self.device, self.dtype, self.plan = settings, device, dtype, plan
        self.loras = loras
        self.sources = sources
        self.stages = stages
        self.vae_compiled = vae_compiled
        self.copies: dict[str, Copy] = {}
        self.prefetch: weights.Prefetch | None = None  # the background fetch of the variants loaded on first use
        self.residency = Residency.for_plan(device, plan, mover=projections.move)
        self.host = HostMemory.for_plan(plan, settings.host_memory, current=variants.BASE.name)  # loaded on first use
        self._lock = threading.Lock()
        self._pipes: dict[str, object] = {variants.BASE.name: base}  # each variant's bf16 pipeline, once loaded
        self.twins: dict[str, Fp8Twin] = {}  # each fp8 copy follows its variant's bf16 LoRA state: variant -> twin
        self.deferred: set[str] = set()  # the base variant's copies setup left to the first request that needs them
        self._add_base(base, budget or SetupBudget())

    # ----- what runs where -----------------------------------------------------------------------------------------

    def placed(self, variant: str) -> bool:
        """Whether a variant's bf16 transformer runs on this GPU (the plan may keep it in CPU memory only)."""
        return self.plan is None or self.plan.where(variant) != memory.CPU

    def route(self, req: Request) -> Request:
        """The request as this GPU runs it: where the plan keeps a variant's bf16 transformer off the GPU, its fp8
        copy runs, and a note says so."""
        if req.fp8 or self.placed(req.model):
            return req
        note = (f"this GPU ({memory.gb(self.plan.budget):.0f} GB) keeps {variants.get(req.model).title} in fp8 only: "
                "it ran as with go_fast (the memory plan in the setup log; a GPU of 40 GB or more runs bf16)")
        return req.replace(fp8=True, notes=(*req.notes, note))

    def get(self, name: str) -> Copy:
        """A copy by name, a variant loaded on first use built now (a failure caches nothing)."""
        with self._lock:
            variant, fp8 = variants.of_transformer(name)
            self.host.asked(variant.name)  # the running one, never dropped; the most recently used
            if name not in self.copies:
                if (variant.at_setup and name not in self.deferred) or not (fp8 or self.placed(variant.name)):
                    raise ValueError(f"{name} does not run on this GPU (memory plan): route the request")
                self._build(variant, fp8)
                self.deferred.discard(name)
            return self.copies[name]

    def graphs(self) -> dict[str, int]:
        """The compiled graphs dynamo holds, by region kind (empty when not compiling)."""
        if not any(copy.compiled for copy in self.copies.values()):
            return {}
        return compiler.graph_counts(self.base.transformer, self.base.vae if self.vae_compiled else None)

    def sync_fp8(self, variant: str) -> None:
        """Bring a variant's fp8 copy to its bf16 LoRA state: re-quantize the layers that either state touches."""
        started = time.monotonic()
        count = self.twins[variant].follow(self.loras, variant)
        if count is not None:
            log.info("lora: %d fp8 layers of %s-fp8 re-quantized in %.2fs", count, variant, time.monotonic() - started)

    # ----- building ------------------------------------------------------------------------------------------------

    def _add_base(self, pipe, budget: SetupBudget) -> None:
        """The base variant's copies, at setup: its bf16 transformer placed first (on the GPU where the plan keeps it,
        so that its fp8 copy is quantized there without crossing PCIe; else in CPU memory), then the fp8 copy (left
        to the first go_fast request when the budget runs short and the bf16 copy serves the first request), then
        the bf16 copy where the plan places it."""
        base = variants.BASE
        self.loras.register(base.name, pipe.transformer, TRANSFORMER)  # a LoRA target from now on
        if self.placed(base.name):
            self.residency.add(base.name, pipe.transformer, resident=False)
            self.use(base.name)
        else:  # in CPU memory, where the plan keeps it (a pipeline given on the GPU is moved there)
            projections.move(pipe.transformer, torch.device("cpu"))
        if self.placed(base.name) and not budget.allows(f"{base.fp8}, the fp8 copy",
                                                        instead="the first go_fast request builds it"):
            self.deferred.add(base.fp8)
        else:
            self._add_fp8(base, pipe)
        if self.placed(base.name):
            self._add_copy(base.name, base, pipe)

    def _add_fp8(self, variant: Variant, pipe, source=None) -> Copy:
        """A variant's fp8 copy: quantized a block at a time onto the GPU (from `source`, else the variant's bf16
        transformer in `pipe`), with room made for it first; it then follows the bf16 variant's LoRAs."""
        bf16 = pipe.transformer
        source = bf16 if source is None else source
        residency = self.residency
        on_gpu = variant.name in residency.resident and residency.modules.get(variant.name) is source
        self.make_room(memory.fp8_bytes(source) + memory.block_bytes(source))
        started = time.monotonic()
        with self.stages("fp8 quantize", f"{variant.name}, {speed.describe('fp8', self.settings)}"):
            (fp8, sync), = speed.optimize("fp8", source, self.settings, device=self.device, bf16=bf16)
        if not on_gpu and residency.budget is not None:  # its bf16 blocks crossed to the GPU to be quantized there
            residency.record(Move(variant.fp8, "gpu", memory.module_bytes(source),
                                            time.monotonic() - started))
        copy = self._add_copy(variant.fp8, variant, with_transformer(pipe, fp8), on_gpu=True)
        self.twins[variant.name] = Fp8Twin(sync)
        return copy

    def _add_copy(self, name: str, variant: Variant, pipe, on_gpu: bool = False) -> Copy:
        """A copy: on the GPU (moved there unless on_gpu), smashed by pruna, compiled."""
        started = time.monotonic()
        fp8 = name == variant.fp8
        if self.residency.modules.get(name) is not pipe.transformer:
            self.residency.add(name, pipe.transformer, resident=on_gpu)
        self.use(name)  # on the GPU before pruna smashes it (least recently used transformers out if needed)
        smashed, caches = step_cache.smash(pipe, self.device)
        copy = Copy(name, smashed, caches, task_pipelines(pipe, variant))
        copy.compiled += speed.optimize("copy", pipe.transformer, self.settings, fp8=fp8)  # beneath the step caches
        if copy.compiled and self.vae_compiled is not None:
            copy.compiled.append(self.vae_compiled)
        self.copies[name] = copy
        log.info("setup: %s ready (%s%s) in %.2fs", name, f"{speed.describe('fp8', self.settings)}, " if fp8 else "",
                 speed.describe("copy", self.settings) or "eager", time.monotonic() - started)
        return copy

    # ----- variants loaded on first use ----------------------------------------------------------------------------

    def _modules(self, variant: str) -> dict[str, torch.nn.Module]:
        """A loaded variant's transformers by name: its bf16 one, and its fp8 copy once built."""
        v = variants.get(variant)
        found = {v.name: self._pipes[v.name].transformer} if v.name in self._pipes else {}
        if v.fp8 in self.copies:
            found[v.fp8] = self.copies[v.fp8].transformer
        return found

    @property
    def loaded(self):
        """The variants loaded on first use, least recently used first (`host`'s accounts)."""
        return self.host.loaded

    def _held(self) -> dict[str, int]:
        """What each variant loaded on first use holds in CPU memory now."""
        return {v: sum(memory.module_bytes(m) for n, m in self._modules(v).items() if n not in self.residency.resident)
                for v in self.host.loaded}

    def _host_room(self, nbytes: int, keep: str) -> None:
        """Drop the least recently used variants loaded on first use (never `keep`) until `nbytes` more fit in CPU
        memory beside what they hold there."""
        for variant, why in self.host.to_drop(nbytes, self._held(), keep):
            self.drop(variant, why)

    def use(self, name: str, working: int = memory.BASE_RESERVE_BYTES) -> None:
        """Make a transformer resident with `working` bytes free beside it (`Residency.use`), each transformer that
        must leave the GPU for it moved out, or dropped with its variant where CPU memory cannot hold it."""
        self.residency.check_fits(name)
        self._move_out(self.residency.evictions(name, working))
        self.residency.use(name, working)

    def make_room(self, nbytes: int) -> None:
        """`nbytes` more free on the GPU (before a copy is built there), as `use` makes it."""
        self._move_out(self.residency.evictions(None, nbytes))

    def _move_out(self, names: list[str]) -> None:
        for name in names:
            if name in self.residency.resident and not self._drop_moved_out(name):
                self.residency.move_out(name)

    def _drop_moved_out(self, name: str) -> bool:
        """Before `name` is moved to CPU memory: the least recently used others dropped where it would not fit, and
        its variant dropped instead (True) where it still would not."""
        variant, _ = variants.of_transformer(name)
        drops = self.host.to_drop_moving_out(name, variant.name, self.residency.size(name), self._held())
        for other, why in drops:
            self.drop(other, why)
        return variant.name in {v for v, _ in drops}

    def drop(self, variant: str, why: str) -> None:
        """Forget a variant loaded on first use: its copies, pipelines, fp8 twin and LoRA state; its weights stay on
        disk, and its next request builds it again."""
        modules = self._modules(variant)
        held = sum(memory.module_bytes(m) for m in modules.values())
        del modules
        for name in (variant, variants.get(variant).fp8):
            self.copies.pop(name, None)
            self.residency.forget(name)
        self.twins.pop(variant, None)
        self._pipes.pop(variant, None)
        self.loras.unregister(variant)
        self.host.forget(variant)
        memory.free()  # the modules go now, not at the next collection
        log.info("memory: %s dropped (%.2f GB): %s; its next request reads it again from the disk", variant,
                 memory.gb(held), why)

    def _read_transformer(self, variant: Variant):
        """A variant's bf16 transformer read from its weights (fetched once) into CPU memory, prepared like every bf16
        transformer; and its scheduler."""
        located = self.prefetch and self.prefetch.folder(variant.name)  # waits for a background fetch under way
        located = located or weights.locate(self.sources[variant.name], variant.name)
        transformer, scheduler = weights.read(located, variant, self.dtype)
        prepare(transformer, self.settings)
        return transformer, scheduler

    def _load(self, variant: Variant):
        """A variant's bf16 pipeline, sharing the base's text encoders and VAE; its transformer in CPU memory until a
        copy places it."""
        started = time.monotonic()
        self._host_room(memory.module_bytes(self.base.transformer), keep=variant.name)  # read into CPU memory first
        transformer, scheduler = self._read_transformer(variant)
        pipe = with_transformer(self.base, transformer, scheduler=scheduler)
        self.loras.register(variant.name, transformer, TRANSFORMER)
        log.info("%s: loaded on first use in %.2fs (shares text encoders and VAE)", variant.name,
                 time.monotonic() - started)
        return pipe

    def _build(self, variant: Variant, fp8: bool) -> None:
        """A variant's copy on first use: the bf16 one places its transformer on the GPU; the fp8 one quantizes it a
        block at a time, from the bf16 transformer while that is untouched (never compiled, no LoRA fused), else
        from a second copy read from the disk."""
        started = time.monotonic()
        if variant.name not in self._pipes:
            self._pipes[variant.name] = self._load(variant)
        if not variant.at_setup:  # the base (its fp8 copy setup deferred) is never dropped
            self.host.add(variant.name)  # the most recently used
        pipe = self._pipes[variant.name]
        if not fp8:
            self._add_copy(variant.name, variant, pipe)
        else:
            untouched = variant.name not in self.copies and not self.loras.touched(variant.name)
            if not untouched:
                self._host_room(memory.module_bytes(pipe.transformer), keep=variant.name)  # the second copy read
            self._add_fp8(variant, pipe, None if untouched else self._read_transformer(variant)[0])
        log.info("%s: built on first use in %.2fs", variant.fp8 if fp8 else variant.name, time.monotonic() - started)


def prepare(transformer, settings: Settings) -> None:
    """What every bf16 transformer gets before it is copied, smashed or compiled (and before the memory plan counts
    it): the switches of the "transformer" stage (the attention backend, the fused projections)."""
    speed.optimize("transformer", transformer, settings)


def with_transformer(pipe, transformer, **changes):
    """A FluxPipeline on another transformer, sharing every other component (no copy, no cast)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**{**pipe.components, "transformer": transformer, **changes})


def task_pipelines(pipe, variant: Variant) -> dict[str, object]:
    """The variant's pipeline of each task, on the same module objects (from_pipe would .to() them), given the
    components its class takes (FluxFillPipeline takes no image encoder)."""
    import inspect

    import diffusers

    def build(name: str):
        cls = getattr(diffusers, name)
        takes = inspect.signature(cls.__init__).parameters
        return cls(**{k: module for k, module in pipe.components.items() if k in takes})

    pipes = {task: pipe if type(pipe).__name__ == name else build(name) for task, name in variant.pipelines.items()}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes
