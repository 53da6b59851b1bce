"""What a prediction makes, shared by the engine (which makes it) and the output stage (which writes it): the trace a
request's stages fill as it runs, what it generated, and what it returns. Imports nothing from flux.engine."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .lora.sources import Fetched
from .residency import Move
from .request import Request


@dataclass
class Trace:
    """One prediction's facts, collected by its stages as they run and passed down to them: the seconds of each
    stage (in the order they first ran), the transformer passes that computed, the moves between CPU and GPU memory."""

    started: float = field(default_factory=time.monotonic)  # when the prediction started running
    timings: dict[str, float] = field(default_factory=dict)
    passes: int = 0  # transformer passes that computed (a step cache's cached steps do not), over every pipeline call
    moves: list[Move] = field(default_factory=list)

    @contextmanager
    def timed(self, stage: str):
        """Adds the seconds the block takes to `stage`."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(stage, time.monotonic() - started)

    def add(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


@dataclass
class Generated:
    """What a request made, before the output stage writes it: the images that passed the safety checkers, in seed
    order, and the facts of the prediction."""

    req: Request  # as it ran (routed)
    images: list[Image.Image]
    seeds: list[int]
    trace: Trace = field(default_factory=Trace)
    flagged: int = 0
    steps: int = 0  # denoising steps each output ran
    loras: list[Fetched] = field(default_factory=list)
    lora_unapplied: int = 0  # tensors of the LoRAs in use for text encoders not changed (T5), named in the log

    @property
    def timings(self) -> dict[str, float]:
        return self.trace.timings

    @property
    def passes(self) -> int:
        return self.trace.passes

    @property
    def moves(self) -> list[Move]:  # transfers between CPU and GPU memory
        return self.trace.moves

    @property
    def started(self) -> float:
        return self.trace.started

    @property
    def moved_bytes(self) -> int:
        return sum(m.bytes for m in self.moves)


@dataclass
class Prediction:
    """What a prediction returns: its files, and its facts."""

    files: list[Path]
    metrics: dict[str, object]
