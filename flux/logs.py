"""Logging for the predictor: one line per stage, plain text (cog turns it into the prediction's logs)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def configure(level: int = logging.INFO) -> None:
    """Route the flux loggers to stderr once; safe to call again."""
    logger = logging.getLogger("flux")
    logger.setLevel(level)
    if not any(getattr(h, "_flux", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("%(message)s"))
        handler._flux = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


class Stages:
    """Setup's stages, each logged with its duration as it ends (one line per stage); the durations are kept for
    the benchmark. A stage entered again adds to its time."""

    def __init__(self, prefix: str = "setup"):
        self.prefix = prefix
        self.seconds: dict[str, float] = {}
        self.started = time.monotonic()
        self._log = logging.getLogger("flux.setup")

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str = ""):
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self._log.info("%s: %s in %.2fs%s", self.prefix, name, seconds, f" ({detail})" if detail else "")

    def total(self) -> float:
        seconds = time.monotonic() - self.started
        self.seconds["total"] = seconds
        self._log.info("%s: total %.2fs (%s)", self.prefix, seconds,
                       ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items() if k != "total"))
        return seconds
