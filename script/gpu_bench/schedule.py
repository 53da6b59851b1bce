"""The deadline, the estimates and the gate: which section starts, and its guard (an error is a row)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .measure import copy_to, free, gpu_available, gpu_state
from .names import BARE, FAIL_ENV
from .report import markdown


STARTED = time.time()  # this process's start, near enough (the heavy imports come later): --budget counts from here


# Seconds each kind of work is expected to take on an H100 before this run has measured it; docs/benchmarks.md
# ("Time estimates") says where each number comes from. Measured numbers replace them as the run goes.
H100 = {"bare call": 6.7, "ours setup": 150.0, "ours rebuild": 30.0, "batch warm-up": 40.0,
        "torchao default": 130.0, "torchao max-autotune": 330.0, "lora files": 10.0, "lora switch": 3.0,
        "offload": 40.0, "boot": 120.0}


# The same on this machine's CPU with the tiny model (only the order of magnitude matters: tests give large budgets).
CPU = {"bare call": 1.0, "ours setup": 150.0, "ours rebuild": 20.0, "batch warm-up": 40.0, "torchao default": 80.0,
       "torchao max-autotune": 200.0, "lora files": 2.0, "lora switch": 1.0, "offload": 10.0, "boot": 150.0}


# A call's time over the bare bf16 call's, per transformer pass (1024x1024: 4.5 s compiled bf16 and 2.97 s for the
# diffusers-torchao recipe against 6.7 s eager, published), and the part that does not shrink with FORA's skipped
# passes (text encoders and the VAE decode, about 0.3 s of 6.7).
CALL_RATIO = {"dev": 0.67, "dev-fp8": 0.45}


FIXED_SHARE = 0.05


class DeadlineReached(BaseException):
    """Raised in the main thread at the deadline (SIGALRM): not an Exception, so no section's guard catches it."""


class Run:
    """The deadline and the results: each row written to results.jsonl and results.md as soon as it exists."""

    def __init__(self, out: Path, deadline: float, meta: dict):
        self.deadline = deadline  # seconds since the epoch
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.meta = meta
        self.section = "start"  # the section rows belong to (the last one gated)
        self.running: str | None = None  # the section whose work runs now (the deadline cuts it)
        (out / "results.jsonl").write_text("")
        self.add({"kind": "machine", **meta})

    def elapsed(self) -> float:
        return time.time() - STARTED

    def left(self) -> float:
        return self.deadline - time.time()

    def arm(self) -> None:
        """From now on the deadline interrupts whatever runs (DeadlineReached)."""
        def stop(signum, frame):
            raise DeadlineReached()

        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.001))

    @staticmethod
    def disarm() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def fits(self, section: str, estimate: float) -> bool:
        if estimate <= self.left():
            print(f"[{self.elapsed():6.0f}s] {section}: starting (estimate {estimate:.0f}s, {self.left():.0f}s left)",
                  file=sys.stderr, flush=True)
            return True
        self.add({"kind": "skipped", "section": section, "reason": "time", "estimate s": round(estimate, 1),
                  "left s": round(self.left(), 1)})
        return False

    def add(self, row: dict) -> dict:
        row = {"at s": round(self.elapsed(), 1), "section": self.section, **row}
        if row["kind"] != "machine":
            row["software"] = self.meta.get("software")
        self.rows.append(row)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
        (self.out / "results.md").write_text(markdown(self.rows))
        if row["kind"] != "machine":
            shown = {k: v for k, v in row.items() if k != "software"}
            print(f"[{self.elapsed():6.0f}s] {json.dumps(shown, default=str, ensure_ascii=False)}", file=sys.stderr,
                  flush=True)
        return row


@dataclass
class Ctx:
    args: argparse.Namespace
    device: object
    dtype: object
    shared: object  # the FluxPipeline everything is built from: its modules are never changed
    run: Run
    work: Path
    sizes: object = None  # flux.memory.Sizes of the model
    needs: dict = field(default_factory=dict)  # memory_needs()
    rowwise: bool = True  # per-row fp8 runs on this device
    known: dict = field(default_factory=dict)  # (name, outputs) -> measured seconds per call
    measured: dict = field(default_factory=dict)  # kind of work -> measured seconds (replaces the guesses)
    engine: object = None
    engines_built: int = 0
    batch_warm: bool = False  # this process compiled ours' batch-2+ graphs (a rebuilt engine reuses them)
    shared_on_gpu: bool = True

    # ----- estimates

    def est(self, what: str) -> float:
        if what in self.measured:
            return self.measured[what]
        guesses = CPU if self.device.type != "cuda" else H100
        scale = 0.1 if self.device.type != "cuda" and self.args.backend == "eager" and what != "bare call" else 1.0
        return guesses[what] * scale

    def call_s(self, name: str, inputs: dict | None, outputs: int = 1) -> float:
        """A call's seconds: measured in this run, else derived from the bare call (measured or guessed)."""
        if (name, outputs) in self.known:
            return self.known[(name, outputs)]
        bare = self.known.get((BARE, outputs)) or self.known.get((BARE, 1), self.est("bare call")) * outputs
        if inputs is None:
            return bare
        from flux import speed

        mode = speed.mode(inputs.get("speed_mode", speed.OFF))
        share = mode.computed_steps(self.args.steps) / self.args.steps
        path = "dev-fp8" if inputs.get("go_fast") or mode.fp8 else "dev"
        return bare * (CALL_RATIO[path] * share * (1 - FIXED_SHARE) + FIXED_SHARE)

    def row_s(self, name: str, inputs: dict | None, outputs: int = 1) -> float:
        return (1 + self.args.repeats) * self.call_s(name, inputs, outputs)

    def engine_s(self) -> float:
        """What getting our engine costs now: nothing when it is built, a rebuild (graphs already compiled in this
        process) after the first build, else the first build."""
        if self.engine is not None:
            return 0.0
        return self.est("ours rebuild") if self.engines_built else self.est("ours setup")

    # ----- sections

    def wanted(self, section: str) -> bool:
        """Whether --only (if given) asks for this section."""
        return not self.args.only or section.startswith(tuple(self.args.only))

    def gate(self, section: str, seconds: float, need: int = 0) -> bool:
        """Whether a section starts: its estimated time fits in what is left, and the GPU memory it adds (bytes) fits
        in what is free; otherwise a row says why it was skipped."""
        if not self.wanted(section):
            return False  # not asked for: no row
        self.run.section = section
        return self.run.fits(section, seconds) and self.memory_fits(need)

    def memory_fits(self, need: int) -> bool:
        """Whether `need` bytes fit in what the GPU has free; else a row says so."""
        available = gpu_available(self.device)
        if available is not None and need > available:
            self.run.add({"kind": "skipped", "reason": "GPU memory", "needs GB": round(need / 1024**3, 2),
                          "available GB": round(available / 1024**3, 2), **gpu_state(self.device)})
            return False
        return True

    def section(self, name: str, seconds: float, need: int, fn) -> bool:
        """fn() as section `name` if it fits (gate); an exception becomes an error row (its message, the GPU memory
        in use then and after freeing) and the run goes on."""
        if not self.gate(name, seconds, need):
            return False
        self.run.running = name
        try:
            if os.environ.get(FAIL_ENV) == name:
                raise RuntimeError(f"injected failure ({FAIL_ENV}={name})")
            fn()
            self.run.running = None
            return True
        except Exception as exc:  # noqa: BLE001  one section failing leaves the others' numbers
            traceback.print_exc()
            row = {"kind": "error", "error": f"{type(exc).__name__}: {exc}"[:600],
                   "at the error": gpu_state(self.device)}
            traceback.clear_frames(exc.__traceback__)  # the section's locals (its models) go with its frames
            del exc
            self.run.running = None
            free()
            self.run.add({**row, "after freeing": gpu_state(self.device)})
            return False

    # ----- the shared transformer and our engine

    def place_shared(self, gpu: bool) -> None:
        """The shared pipeline's bf16 transformer on the GPU (for bare diffusers) or in CPU memory (while a contender
        holds its own copy)."""
        import torch

        if self.device.type == "cuda" and gpu != self.shared_on_gpu:
            self.shared.transformer.to(self.device if gpu else torch.device("cpu"))
            self.shared_on_gpu = gpu
            free()

    def transformer_copy(self):
        """A copy of the shared bf16 transformer on the GPU, the shared one in CPU memory after it."""
        available = gpu_available(self.device)
        from flux import memory

        if self.shared_on_gpu and available is not None and available < memory.module_bytes(self.shared.transformer) \
                + memory.BASE_RESERVE_BYTES:
            self.place_shared(False)  # no room for two: copy from CPU memory
        transformer = copy_to(self.shared.transformer, self.device)
        self.place_shared(False)
        return transformer
