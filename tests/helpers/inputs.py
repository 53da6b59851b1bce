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


def for_variant(variant, image, mask) -> dict:
    """What a request on `variant` gives beyond a prompt: nothing, or an image and a mask for a variant that only
    inpaints (fill-dev: flux/variants.py names no text-to-image pipeline for it)."""
    return {} if "txt2img" in variant.pipelines else {"image": image, "mask": mask}


def first_task(variant) -> str:
    """A task the variant runs (its pipelines' first): text-to-image, or inpainting for one that only inpaints."""
    return next(iter(variant.pipelines))
