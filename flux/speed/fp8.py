"""go_fast's transformer (FLUX_FP8): a copy of a bf16 transformer, its linear layers in fp8 with the torchao config
pruna's "torchao" algorithm uses (dynamic float8 with per-row scales where the GPU has fp8 tensor cores, weight-only
fp8 elsewhere), built a block at a time; and `Fp8Sync`, which keeps it equal to a quantization of the bf16 weights
a LoRA changed, in place (same tensors, so compiled graphs stay valid)."""

from __future__ import annotations

import copy
import functools
import warnings
from contextlib import contextmanager
from typing import Iterable

import torch

from .. import variants
from .projections import drop_unfused, fused_name

@contextmanager
def hardware_check_skipped(skip: bool):
    """torchao refuses dynamic float8 below compute capability 8.9, a CPU included (`_check_hardware_support`,
    imported into torchao.quantization.quant_api), although the same Float8Tensor code runs there through torch's
    own _scaled_mm. Asked for explicitly (FLUX_FP8=fp8dqrow), the check is skipped; torchao has no switch for it."""
    if not skip:
        yield
        return
    import torchao.quantization.quant_api as quant_api

    original = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda *args, **kwargs: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = original


@functools.lru_cache(maxsize=None)
def quant_config(kind: str):
    """The torchao config pruna uses for a quant type (one definition for smash and for re-quantization)."""
    from pruna.algorithms import AlgorithmRegistry

    with warnings.catch_warnings():  # pruna builds every config it knows; torchao deprecates some of them
        warnings.simplefilter("ignore")
        return AlgorithmRegistry["torchao"].import_algorithm_packages()[kind]


class Fp8Sync:
    """Keeps the fp8 transformer equal to a quantization of the bf16 one, layer by layer, in place. A bf16 q, k or v
    layer maps to the fp8 copy's fused layer, re-quantized whole from the bf16 fused layer (which holds q, k and v:
    fuse_projections); a layer the quantizer left in bf16 is copied."""

    def __init__(self, bf16, fp8, kind: str, skip_hardware_check: bool = False):
        self.kind = kind
        self.skip_hardware_check = skip_hardware_check
        self.pairs: dict[int, tuple[torch.nn.Linear, torch.nn.Linear]] = {}  # id(bf16 weight) -> (source, twin)
        bf16_modules, fp8_modules = dict(bf16.named_modules()), dict(fp8.named_modules())
        for name, module in bf16_modules.items():
            if not isinstance(module, torch.nn.Linear):
                continue
            source, twin = module, fp8_modules.get(name)
            if twin is None and (fused := fused_name(name)) in fp8_modules:
                source, twin = bf16_modules[fused], fp8_modules[fused]
            if isinstance(twin, torch.nn.Linear):
                self.pairs[id(module.weight)] = (source, twin)

    def sync(self, weight_ids: Iterable[int]) -> int:
        """Bring the twins of these bf16 weights up to date (ids of the parameters a LoRA change touched)."""
        twins = {id(pair[1]): pair for key in set(weight_ids) if (pair := self.pairs.get(key)) is not None}
        for source, twin in twins.values():
            self._requantize(source, twin)
        return len(twins)

    def _requantize(self, source: torch.nn.Linear, twin: torch.nn.Linear) -> None:
        from torchao.quantization import quantize_

        with torch.no_grad():
            if hasattr(twin.weight, "qdata"):
                fresh = torch.nn.Linear(source.in_features, source.out_features, bias=False, device="meta")
                fresh.weight = torch.nn.Parameter(
                    source.weight.detach().to(twin.weight.qdata.device, copy=True), requires_grad=False
                )
                with hardware_check_skipped(self.skip_hardware_check):
                    quantize_(fresh, quant_config(self.kind))
                twin.weight.qdata.copy_(fresh.weight.qdata)
                twin.weight.scale.copy_(fresh.weight.scale)
            else:
                twin.weight.copy_(source.weight)
            if source.bias is not None:
                twin.bias.copy_(source.bias)


def fp8_transformer(source, kind: str, device: torch.device, skip_hardware_check: bool = False) -> torch.nn.Module:
    """go_fast's transformer: a copy of `source` (a bf16 transformer already prepared: attention backend, fused
    projections) sharing nothing with it, its linear layers quantized with the config pruna's torchao algorithm
    uses (`quant_config`), on `device`.

    It is built one block at a time: each block is copied from the source wherever that lives (on the GPU, or in
    CPU memory on a GPU too small to keep it), and torchao's quantize_ moves it to `device` layer by layer and
    quantizes it there. So the GPU holds what it held before, the fp8 blocks made so far and at most one bf16
    block: never a second bf16 transformer. The result is bit for bit what pruna's smash with torchao makes of a
    whole copy (tests/test_offload.py); smash cannot make it a block at a time, from a model not on the GPU."""
    from torchao.quantization import quantize_

    config = quant_config(kind)
    blocks = {name: list(getattr(source, name)) for name in variants.BLOCK_LISTS}
    skip_blocks = {id(block): None for listed in blocks.values() for block in listed}
    twin = copy.deepcopy(source, skip_blocks)  # everything but the blocks (their places left empty): embedders, norms
    twin.requires_grad_(False)
    with hardware_check_skipped(skip_hardware_check):
        quantize_(twin, config, device=device)
        for name, listed in blocks.items():
            for i, block in enumerate(listed):
                part = copy.deepcopy(block)
                drop_unfused(part)  # only the fused q, k, v are quantized: Fp8Sync maps each bf16 q, k, v layer to them
                part.requires_grad_(False)
                quantize_(part, config, device=device)
                getattr(twin, name)[i] = part
    return twin
