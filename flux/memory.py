"""GPU memory plan: which transformers stay on the GPU, with room for what each request computes.

The text encoders and the VAE always stay on the GPU (every path shares them). The transformers (FLUX.1-dev in
bf16, its fp8 copy for go_fast, FLUX.1-schnell once asked for) are placed by `Residency`: before a request runs,
its transformer is made resident and the room the request needs is made free, moving the least recently used other
transformers to the CPU until both fit. The room a request needs (`working_bytes`) is its activations and the VAE
decode, which grow with the output pixels, plus, in a speed mode, what FORA holds: every block's output until the
call returns (flux/speed.py: fora_bytes), 6.4 GB at 1024x1024 with 4 outputs and 12 GB at 1440x1440.

On one 80 GB H100: encoders + VAE ~10 GB, bf16 dev ~24 GB, fp8 dev ~12 GB, schnell ~24 GB: all three fit with ~9 GB
to spare, enough for any request without a speed mode; a 4-output 1440x1440 speed-mode request moves the least
recently used transformer out first instead of running out of memory (tests/test_memory.py plans it on the
full-size model). Setup makes the fp8 copy from a bf16 copy on the GPU (~24 GB for a moment), so it needs a GPU of
64 GB or more (H100, H200, A100 80GB); a smaller one is a setup error that says so, not an out-of-memory crash later.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

import torch

from .errors import UserError

log = logging.getLogger(__name__)

GiB = 1024**3
BASE_RESERVE_BYTES = 2 * GiB  # CUDA context, cuBLAS/cuDNN workspaces, compile scratch, allocator slack
# Activations of the transformer and the VAE decode per output pixel (bf16): 8 GiB in all at 1440x1440 x4 outputs,
# the reserve this plan held before it was per request. To be calibrated by `script/benchmark gpu` (peak memory).
ACTIVATION_BYTES_PER_PIXEL = 780
MIN_GPU_BYTES = 60 * GiB  # what an "80 GB" card reports is ~79.1 GiB; 64 GB cards report ~60+ GiB


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes a module's parameters and buffers hold, each storage once (fused projections make the separate q, k,
    v weights views into the fused ones); fp8 tensors count their data and scales."""
    seen: set[tuple] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        inner = getattr(tensor, "__tensor_flatten__", None)
        for part in [getattr(tensor, name) for name in inner()[0]] if inner else [tensor]:
            if part.device.type == "meta":
                total += part.numel() * part.element_size()
                continue
            storage = part.untyped_storage()
            key = (storage.data_ptr(), part.device.type, part.device.index)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def fp8_bytes(transformer: torch.nn.Module) -> int:
    """What a transformer takes once go_fast quantizes it (works on the meta device, for planning): each linear
    layer torchao puts in fp8 (both sides multiples of 16) holds one byte a weight plus a float32 scale per row."""
    total = module_bytes(transformer)
    for layer in transformer.modules():
        if isinstance(layer, torch.nn.Linear) and layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
            weight = layer.weight
            total -= weight.numel() * weight.element_size() - weight.numel() - 4 * layer.out_features
    return total


def activation_bytes(width: int, height: int, batch: int) -> int:
    """The room a request's activations and VAE decode need on the GPU (an estimate; see the constants)."""
    return BASE_RESERVE_BYTES + batch * width * height * ACTIVATION_BYTES_PER_PIXEL


def _move(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)


class Residency:
    """Keeps the transformer a request needs on the GPU, with the room the request needs free, within a byte budget;
    least recently used transformers out first."""

    def __init__(self, device: torch.device, budget: int | None, mover: Callable = _move):
        self.device = device
        self.budget = budget  # bytes for transformers and requests; None: no limit (a CPU)
        self.modules: dict[str, torch.nn.Module] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.mover = mover  # (module, device): moves a transformer (flux/speed.py re-ties fused projections)

    @classmethod
    def for_device(cls, device: torch.device, shared_bytes: int, mover: Callable = _move) -> "Residency":
        if device.type != "cuda":
            return cls(device, None, mover)
        total = torch.cuda.get_device_properties(device).total_memory
        if total < MIN_GPU_BYTES:
            raise UserError(f"This GPU has {total / GiB:.0f} GiB; FLUX.1-dev with its bf16 and fp8 paths needs "
                            "64 GB or more (H100, H200, A100 80GB). Run on a larger GPU.")
        log.info("memory: %.1f GB GPU, %.1f GB shared components, %.1f GB for transformers and requests",
                 total / GiB, shared_bytes / GiB, (total - shared_bytes) / GiB)
        return cls(device, total - shared_bytes, mover)

    def add(self, name: str, module: torch.nn.Module, resident: bool) -> None:
        self.modules[name] = module
        self.resident.pop(name, None)  # a module added again (a retried load) is placed afresh
        if resident:
            self.resident[name] = None

    def size(self, name: str) -> int:
        return module_bytes(self.modules[name])  # as it is now (an fp8 copy shrinks when it is quantized)

    def plan(self, name: str, working: int) -> list[str]:
        """The resident transformers to move out (least recently used first) so that `name` and `working` bytes
        fit beside the rest; pure, nothing moves."""
        if self.budget is None:
            return []
        others = [n for n in self.resident if n != name]
        sizes = {n: self.size(n) for n in (*others, name)}  # each module's bytes counted once per plan
        evict = []
        while others and sum(sizes[n] for n in others) + sizes[name] + working > self.budget:
            evict.append(others.pop(0))
        return evict

    def use(self, name: str, working: int = BASE_RESERVE_BYTES) -> None:
        """Make `name` resident and most recently used, with `working` bytes free beside it."""
        if self.budget is not None and self.size(name) > self.budget:
            raise UserError(f"The {name} transformer ({self.size(name) / GiB:.1f} GB) does not fit in this GPU "
                            f"beside the text encoders ({self.budget / GiB:.1f} GB left): use model=dev.")
        for evicted in self.plan(name, working):
            self.resident.pop(evicted)
            self._move(evicted, torch.device("cpu"))
        if name not in self.resident:
            self._move(name, self.device)
        self.resident[name] = None
        self.resident.move_to_end(name)

    def _move(self, name: str, device: torch.device) -> None:
        where = next(self.modules[name].parameters()).device
        if where.type == device.type and (where.index or 0) == (device.index or 0):  # "cuda" is "cuda:0"
            return
        started = time.monotonic()
        self.mover(self.modules[name], device)
        log.info("memory: %s transformer moved to %s in %.2fs", name, device, time.monotonic() - started)
