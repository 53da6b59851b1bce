"""GPU memory plan: which transformers stay on the GPU.

The text encoders and the VAE always stay on the GPU (every path shares them). The transformers (FLUX.1-dev in
bf16, its fp8 copy for go_fast, FLUX.1-schnell once asked for) are placed by `Residency`: as many as fit in
the GPU's memory less what the shared components take and a reserve for activations; when a request needs one
that is not resident, the least recently used ones move to the CPU until it fits.

On one 80 GB H100: encoders + VAE ~10 GB, bf16 dev ~24 GB, fp8 dev ~12 GB, schnell ~24 GB, reserve 8 GB: all
three fit. Setup makes the fp8 copy from a bf16 copy on the GPU (~24 GB for a moment), so it needs a GPU of 64 GB
or more (H100, H200, A100 80GB); a smaller one is a setup error that says so, not an out-of-memory crash later.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

from .errors import UserError

log = logging.getLogger(__name__)

RESERVE_BYTES = 8 * 1024**3  # activations at 1440x1440 x4 outputs, the VAE decode and compile workspace
MIN_GPU_BYTES = 60 * 1024**3  # what an "80 GB" card reports is ~79.1 GiB; 64 GB cards report ~60+ GiB


def module_bytes(module: torch.nn.Module) -> int:
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        inner = getattr(tensor, "__tensor_flatten__", None)
        parts = [getattr(tensor, name) for name in inner()[0]] if inner else [tensor]  # fp8: qdata + scale
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


class Residency:
    """Keeps the transformers a request needs on the GPU within a byte budget, least recently used out first."""

    def __init__(self, device: torch.device, budget: int | None):
        self.device = device
        self.budget = budget  # None: no limit (a CPU, or a GPU with room for everything)
        self.modules: dict[str, torch.nn.Module] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first

    @classmethod
    def for_device(cls, device: torch.device, shared_bytes: int) -> "Residency":
        if device.type != "cuda":
            return cls(device, None)
        total = torch.cuda.get_device_properties(device).total_memory
        if total < MIN_GPU_BYTES:
            raise UserError(f"This GPU has {total / 1024**3:.0f} GiB; FLUX.1-dev with its bf16 and fp8 paths needs "
                            "64 GB or more (H100, H200, A100 80GB). Run on a larger GPU.")
        budget = total - shared_bytes - RESERVE_BYTES
        log.info("memory: %.1f GB GPU, %.1f GB shared components, %.1f GB for transformers",
                 total / 1024**3, shared_bytes / 1024**3, budget / 1024**3)
        return cls(device, budget)

    def add(self, name: str, module: torch.nn.Module, resident: bool) -> None:
        self.modules[name] = module
        self.resident.pop(name, None)  # a module added again (a retried load) is placed afresh
        if resident:
            self.resident[name] = None

    def size(self, name: str) -> int:
        return module_bytes(self.modules[name])  # as it is now (an fp8 copy shrinks when it is quantized)

    def fits(self, names) -> bool:
        return self.budget is None or sum(self.size(n) for n in names) <= self.budget

    def use(self, name: str) -> None:
        """Make `name` resident (moving others out as needed) and most recently used."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        if not self.fits([name]):
            raise UserError(f"The {name} transformer ({self.size(name) / 1024**3:.1f} GB) does not fit in this GPU "
                            f"beside the text encoders ({self.budget / 1024**3:.1f} GB left): use model=dev.")
        while not self.fits([*self.resident, name]):
            evicted, _ = self.resident.popitem(last=False)
            self._move(evicted, torch.device("cpu"))
        self._move(name, self.device)
        self.resident[name] = None

    def _move(self, name: str, device: torch.device) -> None:
        where = next(self.modules[name].parameters()).device
        if where.type == device.type and (where.index or 0) == (device.index or 0):  # "cuda" is "cuda:0"
            return
        started = time.monotonic()
        self.modules[name].to(device)
        log.info("memory: %s transformer moved to %s in %.2fs", name, device, time.monotonic() - started)
