"""Where things land on disk (no third-party imports here: flux/__init__.py reads it before anything else)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def weights_dir() -> Path:
    """Where weights, the LoRA cache and compile caches land: FLUX_WEIGHTS_DIR, default weights/ beside predict.py."""
    return Path(os.environ.get("FLUX_WEIGHTS_DIR") or ROOT / "weights")


def compile_cache_dir(weights: Path | None = None) -> Path:
    """The working compile-cache folder: inductor's and triton's caches, and the artifacts a boot saves."""
    return (weights or weights_dir()) / "compile-cache"
