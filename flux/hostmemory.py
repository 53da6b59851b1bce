"""The CPU memory the variants loaded on first use share (FLUX_HOST_MEMORY_GB less what the memory plan keeps there
for the base variant: `Plan.host_floor`), and which of them to drop so that more fits.

`HostMemory` only keeps the accounts: which variants are loaded, least recently used first, and which one the
running request uses (never dropped). The engine asks it before it reads a variant into CPU memory or moves one of
its transformers out of the GPU (`to_drop`, `to_drop_moving_out`), telling it what each loaded variant holds in CPU
memory now, and drops what it is told, itself (flux/engine/transformers.py: `Transformers.drop`).
"""

from __future__ import annotations

from collections import OrderedDict

from .memory import Plan, gb


class HostMemory:
    """The variants loaded on first use in CPU memory, least recently used first, within the room they share."""

    def __init__(self, room: int | None, current: str | None = None):
        self.room = room  # bytes the variants loaded on first use share in CPU memory; None: no limit
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.current = current  # the variant of the copy asked for last: the running request's, never dropped

    @classmethod
    def for_plan(cls, plan: Plan | None, host_memory: int | None, current: str | None = None) -> "HostMemory":
        """The room the settings' host_memory leaves beside the plan's share; no limit without a plan (no GPU:
        nothing moves) or without a host_memory."""
        room = None if plan is None or host_memory is None else host_memory - plan.host_floor
        return cls(room, current)

    def asked(self, variant: str) -> None:
        """A copy of `variant` is asked for: it is the running one now, and the most recently used if loaded."""
        self.current = variant
        if variant in self.loaded:
            self.loaded.move_to_end(variant)

    def add(self, variant: str) -> None:
        """A variant loaded on first use (again): the most recently used."""
        self.loaded[variant] = None
        self.loaded.move_to_end(variant)

    def forget(self, variant: str) -> None:
        """A variant dropped."""
        self.loaded.pop(variant, None)

    def to_drop(self, nbytes: int, held: dict[str, int], keep: str) -> list[tuple[str, str]]:
        """The variants to drop, in order, and why, so that `nbytes` more fit beside what the loaded ones hold in CPU
        memory (`held`: each one's bytes there now): the least recently used first, never `keep` nor the running
        one. Pure: nothing is dropped here."""
        if self.room is None:
            return []
        total = sum(held.get(v, 0) for v in self.loaded)
        drops = []
        for other in [v for v in self.loaded if v not in (keep, self.current)]:
            if total + nbytes <= self.room:
                break
            drops.append((other, f"{gb(nbytes):.2f} GB more would not fit in the {gb(self.room):.1f} GB of CPU "
                                  "memory the variants share"))
            total -= held.get(other, 0)
        return drops

    def to_drop_moving_out(self, name: str, variant: str, nbytes: int, held: dict[str, int]) -> list[tuple[str, str]]:
        """Before `name`, a transformer of `variant` of `nbytes`, is moved out of the GPU into CPU memory: the others
        to drop (`to_drop`), and last `variant` itself where it still would not fit (dropped instead of moved).
        Nothing for the base variant (not loaded on first use), the running one, or without a limit."""
        if variant not in self.loaded or variant == self.current or self.room is None:
            return []
        drops = self.to_drop(nbytes, held, keep=variant)
        dropped = {v for v, _ in drops}
        if sum(held.get(v, 0) for v in self.loaded if v not in dropped) + nbytes > self.room:
            drops.append((variant, f"moved out of the GPU, {name} would not fit in the {gb(self.room):.1f} GB of "
                                   "CPU memory the variants share"))
        return drops
