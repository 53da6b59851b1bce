"""Output sizes: the aspect-ratio table, custom sizes and sizes derived from an input image.

FLUX works on 16-pixel multiples (8x VAE, 2x2 patches), so every size here is one.
"""

from __future__ import annotations

from .errors import UserError

MULTIPLE = 16
MIN_SIDE = 256
MAX_SIDE = 1440

# Width x height at 1 megapixel, per aspect ratio (Replicate's FLUX.1-dev table).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
CUSTOM = "custom"
MEGAPIXELS = ("1", "0.25")


def round_to_multiple(value: float, multiple: int = MULTIPLE) -> int:
    """Round half up to the nearest multiple (Python's round() would round half to even)."""
    return int(value / multiple + 0.5) * multiple


def table_size(aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    """Width and height for a named aspect ratio; 0.25 MP halves each side."""
    width, height = ASPECT_RATIOS[aspect_ratio]
    if megapixels == "0.25":
        width, height = width // 2, height // 2
    return width, height


def custom_size(width: int, height: int) -> tuple[int, int]:
    """A custom size, each side rounded to the nearest multiple of 16."""
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise UserError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {side}.")
    return round_to_multiple(width), round_to_multiple(height)


def size_for_image(width: int, height: int) -> tuple[int, int]:
    """The output size for an input image: its aspect, each side within 256..1440, multiples of 16.

    The image is scaled only when a side is out of bounds: down until the long side
    fits, or up until the short side does. 2000x1000 -> 1440x720, 480x320 stays,
    320x240 -> 336x256.
    """
    long_side, short_side = max(width, height), min(width, height)
    if long_side * MIN_SIDE > short_side * MAX_SIDE:
        raise UserError(
            f"The image is {width}x{height}, an aspect ratio of {long_side / short_side:.2f}:1. "
            f"Outputs must have both sides between {MIN_SIDE} and {MAX_SIDE} pixels, which allows at most "
            f"{MAX_SIDE / MIN_SIDE:.2f}:1: crop the image closer to square."
        )
    scale = 1.0
    if long_side > MAX_SIDE:
        scale = MAX_SIDE / long_side
    elif short_side < MIN_SIDE:
        scale = MIN_SIDE / short_side
    out_w = min(MAX_SIDE, max(MIN_SIDE, round_to_multiple(width * scale)))
    out_h = min(MAX_SIDE, max(MIN_SIDE, round_to_multiple(height * scale)))
    return out_w, out_h


def kontext_size(image_width: int, image_height: int, megapixels: str) -> tuple[int, int]:
    """The output size of a Kontext edit that keeps the input's aspect: the Kontext training resolution (diffusers'
    list, about 1 MP) nearest the image's aspect ratio, as the pipeline resizes the image itself; 0.25 MP halves each
    side (multiples of 16)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    aspect = image_width / image_height
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    if megapixels == "0.25":
        width, height = round_to_multiple(width / 2), round_to_multiple(height / 2)
    return width, height
