"""Setup's time budget: Replicate fails a container whose setup() has not finished within 600 s of its start, so
setup does what the first request needs and defers what can wait once the budget runs short.

FLUX_SETUP_BUDGET_S (flux/settings.py; default 540) counts from the process's start as the OS records it, imports
included. Each piece of work that can wait asks `allows(what, need_s)` before it starts: it runs when more than
`need_s` plus a reserve (for the rest of setup) is left; else it is recorded as deferred, with what will do it
instead, and setup logs the list once at its end (`report`). What can wait (flux/engine): the warm-up compiles beyond
the default size (the first request at each size compiles it), the base variant's fp8 copy where its bf16 one runs
on the GPU (the first go_fast request builds it), the background prefetch (each variant's first request fetches its
weights).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_S = 540.0  # Replicate's 600 s, less a minute for the server's own start and the health checks
RESERVE_S = 30.0  # kept for the setup work that follows a deferrable piece (loading, placing, logging)


def process_age_s() -> float:
    """Seconds since this process started, as the OS counts them (imports included)."""
    import psutil

    return max(time.time() - psutil.Process().create_time(), 0.0)


@dataclass
class SetupBudget:
    seconds: float = float("inf")  # inf: unbounded (tests and tools that build an engine themselves)
    deferred: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.seconds - process_age_s()

    def allows(self, what: str, need_s: float = 0.0, instead: str = "") -> bool:
        """Whether work that can wait fits: more than need_s and the reserve left. If not, it is recorded as
        deferred (`instead`: what does it then) and False returned."""
        left = self.left()
        if left > need_s + RESERVE_S:
            return True
        self.deferred.append(f"{what} ({instead})" if instead else what)
        log.info("setup: deferring %s: %.0fs of the %.0fs setup budget left (FLUX_SETUP_BUDGET_S)", what,
                 max(left, 0.0), self.seconds)
        return False

    def report(self) -> None:
        if self.deferred:
            log.warning("setup: deferred to stay within FLUX_SETUP_BUDGET_S=%g (%.0fs since the process started): %s",
                        self.seconds, process_age_s(), "; ".join(self.deferred))
