"""Inputs as cog passes them: every declared input, defaults filled in."""

from __future__ import annotations

import warnings

from cog import _inspector


def declared_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _inspector.create_predictor("predict", "Predictor").inputs


def defaults() -> dict:
    """The value cog gives each optional input the caller leaves out."""
    return {name: field.default for name, field in declared_inputs().items() if name != "prompt"} | {"prompt": "a knitted purple prune"}
