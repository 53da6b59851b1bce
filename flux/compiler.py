"""torch.compile for the transformer blocks and the VAE decoder: the limits, the graphs, the fallback.

Regional compilation: each of FLUX's 57 blocks has its forward compiled (dynamic shapes, fullgraph), and the blocks
of a kind share their graphs, because dynamo caches graphs per code object and the weights are graph inputs. So
in-place LoRA fusing and fp8 re-quantization need no recompile, and one compilation serves every size.

How few graphs:
  - Strides. FLUX's single-stream blocks return slices of one tensor, so block 0 would get dense inputs and the
    others strided ones: two graphs. Every block's inputs are made dense before the compiled call (a size-1
    dimension's stride is rewritten, no copy; a strided slice is copied, a few MB).
  - Batch 1. dynamo specializes a size of 1, so batch 1 would get graphs of its own. On the bf16 path the batch
    dimension is marked unbacked (one symbol for every input's batch), and one graph serves batches 1 to 4. torchao's
    dynamic float8 asks whether the batch is 1 while quantizing activations (`_get_reduction_params`), which an
    unbacked size cannot answer, so the fp8dqrow path keeps dynamo's batch-1 graph: two per block kind.
  That is one graph per block kind on bf16 and two on fp8dqrow, where torch's defaults made four on each.

The limits are the project's (`configure`): importing pruna raises dynamo's recompile limit to 128 as a side effect;
here it is set to what this model needs with room to spare, and `fullgraph=True` turns anything beyond it into an
error instead of a silent fallback.

A compile that fails (a backend error, an unsupported op) makes that path eager again (`Compiled.revert`), with a
loud log line; it never fails the boot or a prediction (flux/engine/transformers.py: Copy).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 8  # graphs per code object: 3 are expected per block kind (bf16, fp8 batch 1, fp8 batches 2+)
ACCUMULATED_RECOMPILE_LIMIT = 64

# inductor flags of the published FLUX recipes (huggingface/flux-fast, diffusers-torchao).
TUNING_FLAGS = dict(conv_1x1_as_mm=True, epilogue_fusion=False, coordinate_descent_tuning=True,
                    coordinate_descent_check_all_directions=True)
# Their values before anything changed them (this module is imported before pruna smashes a model with torchao,
# whose config setter turns coordinate descent tuning on): what FLUX_INDUCTOR_TUNING_FLAGS=0 restores.
_UNTUNED = {name: getattr(torch._inductor.config, name) for name in TUNING_FLAGS}


def configure(inductor_tuning: bool) -> None:
    """dynamo's limits and inductor's tuning flags, as this project wants them (after pruna and torchao, which
    change both when imported or used)."""
    limit_recompiles()
    tune_inductor(inductor_tuning)


def limit_recompiles() -> None:
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.accumulated_recompile_limit = ACCUMULATED_RECOMPILE_LIMIT


def tune_inductor(on: bool) -> None:
    """inductor's tuning flags of the published recipes, or inductor's own defaults."""
    for name, tuned in TUNING_FLAGS.items():
        setattr(torch._inductor.config, name, tuned if on else _UNTUNED[name])


# ----- one compiled region ----------------------------------------------------------------------------------------


@dataclass
class Compiled:
    """Forwards replaced by compiled ones; `revert()` puts the eager ones back (instance attributes removed)."""

    backend: str
    regions: list[tuple[torch.nn.Module, object]] = field(default_factory=list)  # (module, its forward before)
    kinds: set[str] = field(default_factory=set)

    def revert(self) -> None:
        for module, before in self.regions:
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before
        self.regions.clear()

    def wrap(self, module: torch.nn.Module, kind: str, dynamic_batch: str, args: int) -> None:
        before = module.__dict__.get("forward")
        compiled = torch.compile(module.forward, backend=self.backend, dynamic=True, fullgraph=True)
        module.forward = _entry(compiled, kind, dynamic_batch, args)
        self.regions.append((module, before))
        self.kinds.add(kind)


def _standard_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def dense(t: torch.Tensor) -> torch.Tensor:
    """t with the strides of a fresh contiguous tensor of its shape, so that one graph serves every caller."""
    standard = _standard_strides(t.shape)
    if t.stride() == standard:
        return t
    if t.is_contiguous():  # only the strides of size-1 dimensions differ: the same elements, no copy
        return t.as_strided(t.shape, standard)
    return t.contiguous()


_UNBACKED_SHAPE_ID = "shape_id" in inspect.signature(torch._dynamo.decorators.mark_unbacked).parameters


def _entry(compiled, kind: str, dynamic_batch: str, args: int):
    """The compiled forward behind a plain-Python entry that makes the first `args` tensor inputs dense and, with
    dynamic_batch "unbacked", marks their batch dimension unbacked (and the keyword `temb`'s)."""
    unbacked = dynamic_batch == "unbacked" and _UNBACKED_SHAPE_ID

    def forward(*inputs, **kwargs):
        inputs = tuple(dense(t) if i < args and isinstance(t, torch.Tensor) else t for i, t in enumerate(inputs))
        for name in list(kwargs)[: max(0, args - len(inputs))]:
            if isinstance(kwargs[name], torch.Tensor):
                kwargs[name] = dense(kwargs[name])
        if unbacked:
            batch = [t for t in (*inputs[:args], *kwargs.values()) if isinstance(t, torch.Tensor) and t.ndim >= 2]
            for t in batch:
                torch._dynamo.decorators.mark_unbacked(t, 0, shape_id="batch")
        with _region(kind):
            try:
                return compiled(*inputs, **kwargs)
            except Exception as exc:
                if is_compile_error(exc) and not hasattr(exc, "flux_region"):
                    exc.flux_region = kind  # which compiled region failed (FastPath.fall_back reverts that one)
                raise

    return forward


# ----- FLUX's regions -------------------------------------------------------------------------------------------

DOUBLE, SINGLE, VAE_DECODER = "double-stream blocks", "single-stream blocks", "VAE decoder"


def compile_blocks(transformer, backend: str, dynamic_batch: str) -> Compiled:
    """Each block's forward compiled (applied after pruna's smash, while FORA is off: FORA wraps the result)."""
    compiled = Compiled(backend)
    for kind, blocks in ((DOUBLE, transformer.transformer_blocks), (SINGLE, transformer.single_transformer_blocks)):
        for block in blocks:
            # hidden_states, encoder_hidden_states and temb: the tensors with a batch dimension (passed by keyword)
            compiled.wrap(block, kind, dynamic_batch, args=3)
    return compiled


def compile_vae_decoder(vae, backend: str) -> Compiled:
    compiled = Compiled(backend)
    compiled.wrap(vae.decoder, VAE_DECODER, "backed", args=1)
    return compiled


def graph_counts(transformer=None, vae=None) -> dict[str, int]:
    """How many graphs dynamo holds for each region kind (all paths together: they share the code objects).

    There is no public API for a function's cache entries; torch._dynamo.eval_frame's debug helper reads them.
    """
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    codes = {}
    if transformer is not None:
        codes[DOUBLE] = type(transformer.transformer_blocks[0]).forward.__code__
        codes[SINGLE] = type(transformer.single_transformer_blocks[0]).forward.__code__
    if vae is not None:
        codes[VAE_DECODER] = type(vae.decoder).forward.__code__
    return {kind: len(_debug_get_cache_entry_list(code)) for kind, code in codes.items()}


def is_compile_error(exc: BaseException) -> bool:
    """An error of dynamo or of a compiler backend (not of the model's own computation)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException) or type(exc).__module__.startswith(("torch._inductor", "torch._dynamo"))


# ----- compile times --------------------------------------------------------------------------------------------

_current = threading.local()


@contextmanager
def _region(kind: str):
    previous = getattr(_current, "kind", None)
    _current.kind = kind
    try:
        yield
    finally:
        _current.kind = previous


class CompileTimes:
    """Records each graph compiled while it is active: (region kind, seconds), through dynamo's compile callbacks."""

    def __init__(self):
        self.graphs: list[tuple[str, float]] = []
        self._started: dict[str, float] = {}

    def __enter__(self) -> "CompileTimes":
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._start)
        callback_handler.remove_end_callback(self._end)

    def _start(self, *args) -> None:
        self._started[getattr(_current, "kind", None) or "other"] = time.monotonic()

    def _end(self, *args) -> None:
        kind = getattr(_current, "kind", None) or "other"
        started = self._started.pop(kind, None)
        if started is not None:
            self.graphs.append((kind, time.monotonic() - started))

    def summary(self) -> str:
        by_kind: dict[str, list[float]] = {}
        for kind, seconds in self.graphs:
            by_kind.setdefault(kind, []).append(seconds)
        return "; ".join(f"{kind}: {len(s)} graph{'s' if len(s) != 1 else ''} in {sum(s):.1f}s"
                         f" ({', '.join(f'{x:.1f}' for x in s)})" for kind, s in by_kind.items()) or "no new graphs"
