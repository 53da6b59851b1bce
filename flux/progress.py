"""Progress in the logs: a denoising bar that Replicate's clients parse, and meters for long setup work.

Each prediction logs one line per denoising step in tqdm's format (tqdm's own `format_meter`), e.g.

     25%|██▌       | 7/28 [00:01<00:03,  5.12it/s]

which is what replicate-python's `Prediction.progress`, replicate-javascript's `parseProgressFromLogs` and
replicate-go read from the logs (the last line matching `^\\s*(\\d+)%\\s*\\|.+?\\|\\s*(\\d+)/(\\d+)`). One bar covers the
whole prediction: every output, and every pipeline call when a batch is generated one output at a time. Its total
is the steps that really run (img2img and inpainting run `prompt_strength` of them, a variant with a step cap at
most that many), read from the pipeline as it starts denoising. A line per step, no carriage returns: every log
line is kept.
"""

from __future__ import annotations

import logging
import threading
import time

from tqdm import tqdm

log = logging.getLogger("flux.progress")


class Steps:
    """A diffusers `callback_on_step_end` that logs the prediction's bar and records when each call's denoising
    ends (`calls`: how many pipeline calls the prediction expects; `expect` changes it for the calls still to come)."""

    def __init__(self, calls: int = 1):
        self.started = time.monotonic()
        self.done = 0
        self.total: int | None = None
        self.steps_per_call: int | None = None
        self._calls_left = calls
        self.last_step_at: float | None = None

    def expect(self, calls: int) -> None:
        """From now on `calls` more pipeline calls (the one-output-at-a-time fallback after an out-of-memory)."""
        self._calls_left = calls

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step == 0:  # a call starts denoising: it now knows how many steps it runs
            self.steps_per_call = pipe.num_timesteps
            self.total = self.done + pipe.num_timesteps * max(self._calls_left, 1)
            self._calls_left -= 1
        self.done += 1
        self.last_step_at = time.monotonic()
        log.info("%s", tqdm.format_meter(self.done, self.total, self.last_step_at - self.started))
        return callback_kwargs


class Meter:
    """Progress of long setup work (downloads in bytes, warm-up in items), logged every `every_percent` of the
    total or every `every_s` seconds, whichever comes first, and once at the end. Thread-safe: parallel ranged
    downloads advance one meter."""

    def __init__(self, what: str, total: float | None, *, unit: str = "bytes", every_percent: float = 5,
                 every_s: float = 10, logger: logging.Logger = log):
        self.what, self.total, self.unit = what, total, unit
        self.every_percent, self.every_s = every_percent, every_s
        self.done = 0.0
        self.started = self._last_at = time.monotonic()
        self._last_percent = 0.0
        self._lock = threading.Lock()
        self._log = logger

    def advance(self, amount: float = 1, detail: str = "") -> None:
        with self._lock:
            self.done += amount
            now = time.monotonic()
            percent = 100 * self.done / self.total if self.total else 0.0
            finished = self.total is not None and self.done >= self.total
            if not (finished or now - self._last_at >= self.every_s
                    or (self.total and percent - self._last_percent >= self.every_percent)):
                return
            self._last_at, self._last_percent = now, percent
            self._log.info("%s", self.line(now, detail))

    def line(self, now: float | None = None, detail: str = "") -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        if self.unit == "bytes":
            done = human_bytes(self.done)
            of = f" of {human_bytes(self.total)} ({100 * self.done / self.total:.0f}%)" if self.total else ""
            rate = f", {human_bytes(self.done / elapsed)}/s"
        else:
            done = f"{self.done:g}"
            of = f" of {self.total:g} {self.unit}" if self.total else f" {self.unit}"
            rate = ""
        return f"{self.what}: {done}{of}{rate}, {elapsed:.1f}s{f' ({detail})' if detail else ''}"


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class HubBytes(tqdm):
    """A tqdm class for huggingface_hub's `snapshot_download(tqdm_class=...)`: its bar of the bytes written
    ("Reconstructing ...", which every file's download advances) advances a Meter instead of drawing on a terminal;
    its other bars (files fetched, bytes received) are silent."""

    meter_what = "download"

    def __init__(self, *args, **kwargs):
        # huggingface_hub gives a class that is not its own no name: the bytes-written bar is told by its description
        self._counts = kwargs.get("unit") == "B" and str(kwargs.get("desc", "")).startswith("Reconstructing")
        self._meter: Meter | None = None
        kwargs.update(disable=False, file=_Nowhere(), mininterval=3600)
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1):
        if self._counts and n:
            if self._meter is None:
                self._meter = Meter(self.meter_what, None)
            self._meter.total = self.total or None  # grows as each file's size becomes known
            self._meter.advance(n)
        return super().update(n)

    @classmethod
    def named(cls, what: str) -> type["HubBytes"]:
        return type(cls.__name__, (cls,), {"meter_what": what})


class _Nowhere:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass
