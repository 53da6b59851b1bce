"""Reading user images and masks, writing output files."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

log = logging.getLogger(__name__)

MAX_INPUT_PIXELS = 64_000_000  # 8000x8000; larger headers are refused before decoding
MIN_INPUT_SIDE = 64
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS  # PIL warns above this and refuses above twice this, at open()
EXTENSIONS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def _open(path: Path, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_INPUT_PIXELS:
                raise UserError(
                    f"{name} is {w}x{h} pixels ({w * h / 1e6:.0f} MP); the limit is {MAX_INPUT_PIXELS / 1e6:.0f} MP: "
                    "downscale it before sending."
                )
            img.load()
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "too large"
        raise UserError(
            f"{name} is {size}; the limit is {MAX_INPUT_PIXELS / 1e6:.0f} MP: downscale it before sending."
        ) from None
    except FileNotFoundError:
        raise UserError(f"{name} could not be read: send an uploaded file, a data: URI or an http(s) URL.") from None
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image file PIL can read: send a PNG, JPEG or WebP.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{name} could not be decoded ({exc}); the file may be truncated or corrupt: send it again.") from None
    if min(img.size) < MIN_INPUT_SIDE:
        raise UserError(
            f"{name} is {img.width}x{img.height} pixels; each side must be at least {MIN_INPUT_SIDE}: send a larger image."
        )
    return ImageOps.exif_transpose(img)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale scaled to 8 bits (PIL's convert("L") would clip them to white)."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64) / 257.0
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max() > 255:  # 16-bit data in a 32-bit container, as 16-bit PNGs often open
            arr = arr / 257.0
    else:
        return img
    return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), "L")


def load_image(path: Path | str, name: str = "image") -> Image.Image:
    """An RGB image, EXIF orientation applied, alpha flattened onto white."""
    img = _to_8bit(_open(Path(path), name))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_mask(path: Path | str, size: tuple[int, int]) -> Image.Image:
    """A greyscale mask (white = repaint), resized to `size` if it differs."""
    mask = _to_8bit(_open(Path(path), "mask"))
    if mask.mode in ("RGBA", "LA", "PA", "P"):
        mask = mask.convert("RGBA")
        background = Image.new("RGBA", mask.size, (0, 0, 0, 255))
        mask = Image.alpha_composite(background, mask)
    mask = mask.convert("L")
    if mask.size != size:
        log.info("mask is %dx%d, resized to the image's %dx%d", *mask.size, *size)
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    return mask


def save(images: list[Image.Image], out_dir: Path, output_format: str, quality: int) -> list[Path]:
    """Write images as out-<i>.<format>; quality applies to webp and jpg."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = EXTENSIONS[output_format]
    options = {} if fmt == "PNG" else {"quality": quality}
    paths = []
    for i, img in enumerate(images):
        path = out_dir / f"out-{i}.{output_format}"
        img.save(path, format=fmt, **options)
        paths.append(path)
    return paths
