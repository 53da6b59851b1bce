"""Test images built in code."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def encoded(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image with some noise: distinct pixels, compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 / max(width - 1, 1))
    g = (y * 255 / max(height - 1, 1))
    b = ((x + y) * 127 / max(width + height - 2, 1))
    arr = np.stack([r, g, b], axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def save(img: Image.Image, folder: Path, name: str, **options) -> Path:
    path = folder / name
    img.save(path, **options)
    return path


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black (keep) with a white (repaint) rectangle."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask
