"""Logging for the predictor: one line per stage, plain text (cog turns it into the prediction's logs)."""

from __future__ import annotations

import logging
import sys


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
