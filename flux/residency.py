"""Where each transformer is: the residency the memory plan (flux/memory.py) asks for, kept within its GPU budget while
requests come and go, and every move between CPU and GPU memory, recorded for the prediction that made it."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError
from .memory import BASE_RESERVE_BYTES, Plan, gb, module_bytes

log = logging.getLogger(__name__)


def _move(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)


@dataclass(frozen=True)
class Move:
    """One transfer between CPU and GPU memory: a transformer moved whole, or T5 streamed for a prompt."""

    name: str
    to: str  # "gpu", "cpu" or "streamed"
    bytes: int
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.name} streamed" if self.to == "streamed" else f"{self.name} to {self.to}"


MOVES_KEPT = 64  # moves made outside a prediction that Residency keeps (setup's, a tool's)


class Residency:
    """Keeps the transformer a request needs on the GPU, with the room the request needs free, within a byte budget:
    "on demand" transformers out first, then resident ones, least recently used first in each. Where a module is
    is this object's record (`resident`); on a CPU with a simulated budget the moves are made (on one device) and
    counted the same way. Every move is appended to `moves`, or to a prediction's own list while it runs
    (`recording`)."""

    def __init__(self, device: torch.device, budget: int | None, mover: Callable = _move, pinned=()):
        self.device = device
        self.offload_device = torch.device("cpu")
        self.budget = budget  # bytes for transformers and requests; None: no limit (a CPU)
        self.pinned = set(pinned)  # resident in the plan: moved out only after every other
        self.modules: dict[str, torch.nn.Module] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.mover = mover  # (module, device): moves a transformer (flux/speed/projections.py re-ties fused projections)
        self.moves: list[Move] = []  # outside a prediction: the last MOVES_KEPT (record)
        self._recording = False  # a prediction's trace receives the moves (recording)

    @classmethod
    def for_plan(cls, device: torch.device, plan_: Plan | None, mover: Callable = _move) -> "Residency":
        if plan_ is None:
            return cls(device, None, mover)
        return cls(device, plan_.budget - plan_.shared_gpu, mover, pinned=plan_.resident)

    @contextmanager
    def recording(self, into: list[Move]):
        """Within the block, every move is appended to `into` (a prediction's trace) instead of `moves`."""
        before, self.moves, self._recording = self.moves, into, True
        try:
            yield
        finally:
            self.moves, self._recording = before, False

    def record(self, move: Move) -> None:
        """A move (made here, or outside this object: a transformer quantized onto the GPU from CPU memory). Outside a
        prediction (setup, a tool) only the last MOVES_KEPT are kept: a container that runs for days keeps no
        growing log."""
        self.moves.append(move)
        if not self._recording:
            del self.moves[:-MOVES_KEPT]

    def add(self, name: str, module: torch.nn.Module, resident: bool) -> None:
        """A transformer to place; resident: it is on the GPU already."""
        self.modules[name] = module
        self.resident.pop(name, None)  # a module added again (a retried load) is placed afresh
        if resident or self.budget is None:
            self.resident[name] = None

    def forget(self, name: str) -> None:
        """A transformer dropped: no longer placed or counted."""
        self.modules.pop(name, None)
        self.resident.pop(name, None)

    def size(self, name: str) -> int:
        return module_bytes(self.modules[name])  # as it is now (an fp8 copy shrinks when it is quantized)

    def evictions(self, name: str | None, working: int) -> list[str]:
        """The resident transformers to move out so that `name` (None: nothing more) and `working` bytes fit beside
        the rest; pure, nothing moves."""
        if self.budget is None:
            return []
        others = sorted((n for n in self.resident if n != name), key=lambda n: n in self.pinned)  # stable: LRU
        sizes = {n: self.size(n) for n in others}  # each module's bytes counted once per plan
        need = (self.size(name) if name is not None else 0) + working
        evict = []
        while others and sum(sizes[n] for n in others) + need > self.budget:
            evict.append(others.pop(0))
        return evict

    def make_room(self, nbytes: int) -> None:
        """Move transformers out until `nbytes` more fit (before a new one is built on the GPU)."""
        self._evict(self.evictions(None, nbytes))

    def check_fits(self, name: str) -> None:
        """Refuse a transformer bigger than the whole budget, before anything moves."""
        if self.budget is not None and self.size(name) > self.budget:
            raise UserError(f"The {name} transformer ({gb(self.size(name)):.1f} GB) does not fit in this GPU "
                            f"beside the text encoders ({gb(self.budget):.1f} GB left): use model=dev.")

    def use(self, name: str, working: int = BASE_RESERVE_BYTES) -> None:
        """Make `name` resident and most recently used, with `working` bytes free beside it (what must go moved out
        first; a caller that drops some instead asks `evictions` and moves the rest out itself: `move_out`)."""
        self.check_fits(name)
        self._evict(self.evictions(name, working))
        if name not in self.resident:
            self._move(name, gpu=True)
        self.resident[name] = None
        self.resident.move_to_end(name)

    def _evict(self, names: list[str]) -> None:
        for name in names:
            self.move_out(name)

    def move_out(self, name: str) -> None:
        """A resident transformer moved to CPU memory (nothing for one no longer resident: dropped meanwhile)."""
        if name in self.resident:
            self.resident.pop(name)
            self._move(name, gpu=False)

    def _move(self, name: str, gpu: bool) -> None:
        started = time.monotonic()
        self.mover(self.modules[name], self.device if gpu else self.offload_device)
        move = Move(name, "gpu" if gpu else "cpu", self.size(name), time.monotonic() - started)
        self.record(move)
        log.info("memory: %s moved to the %s in %.2fs (%.2f GB)", name, move.to.upper(), move.seconds, gb(move.bytes))
