"""Inputs as cog passes them: every declared input, defaults filled in (read by script/schema.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "script"))

import schema  # noqa: E402


def declared_inputs():
    return schema.predictor_info().inputs


def defaults() -> dict:
    """The value cog gives each optional input the caller leaves out, and a prompt."""
    return schema.input_defaults() | {"prompt": "a knitted purple prune"}
