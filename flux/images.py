"""Reading user images and masks, writing output files.

An image or mask comes from one of two kinds of caller. The server (predict.py) hands over what its caller sent as
`Delivered`: such a file is read only if it is one the server fetched itself for this prediction (a regular file,
in the folder the server writes what it fetches to, named as the server names its temporary files); anything else
(a path on this machine, a FIFO, a device, a link) is refused before it is opened, with one message that does not
depend on what exists there. A Python caller of the engine (tests, scripts) passes its own file path or a PIL image,
which is read as given (a regular file only).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

log = logging.getLogger(__name__)

MAX_INPUT_PIXELS = 64_000_000  # 8000x8000; larger headers are refused before decoding
MIN_INPUT_SIDE = 64
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS  # PIL warns above this and refuses above twice this, at open()
EXTENSIONS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


@dataclass(frozen=True)
class Delivered:
    """A file input as the server passed it on: `value` is what the server handed to the predictor (its path object
    for a file it fetched, or a string it did not fetch), `folder` and `prefix` where and how the server writes the
    files it fetches. Read only if it is such a file (`open`). A caller cannot name another prediction's file there:
    the server names them at random, never shows the names, and deletes them after their prediction."""

    value: object
    folder: str
    prefix: str

    def open(self, name: str):
        """The file, opened for reading, or a UserError whose message says nothing about what is at the path. The
        checks run on the open file (no link is followed, a FIFO or device is opened without blocking and refused)."""
        if isinstance(self.value, (str, bytes)) or not isinstance(self.value, os.PathLike):
            raise _unreadable(name)  # the server fetches nothing it passes on as a string
        path = os.path.abspath(os.fspath(self.value))
        if (os.path.dirname(path) != os.path.abspath(self.folder)
                or not os.path.basename(path).startswith(self.prefix)):
            raise _unreadable(name)
        return _open_regular(path, name, delivered=True)


def _unreadable(name: str) -> UserError:
    return UserError(f"{name} could not be read: send an uploaded file, a data: URI or an http(s) URL.")


def _source(value, name: str):
    """What Image.open reads: a Delivered file opened after its checks, or a Python caller's own regular file."""
    if isinstance(value, Delivered):
        return value.open(name)
    return _open_regular(Path(value), name, delivered=False)


def _open_regular(path, name: str, delivered: bool):
    """A regular file opened for reading without blocking (a FIFO or a device is refused, not waited on); a file the
    server delivered also has no link on its way, one name, and this process as its owner."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | (os.O_NOFOLLOW if delivered else 0))
    except OSError:
        raise _unreadable(name) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or delivered and (info.st_nlink != 1 or info.st_uid != os.getuid()):
        os.close(fd)
        raise _unreadable(name)
    return os.fdopen(fd, "rb")


def _open(value, name: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return _checked(value, name)  # exif_transpose returns a new image: the caller's is never changed
    with _source(value, name) as file:
        return _checked(_decode(file, name), name)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _without_png_text(file):
    """A PNG without its text chunks, which no pixel depends on (a ComfyUI workflow is kept in one): PIL would
    decompress each whole, and refuses a valid image whose text unpacks to more than 1 MB. The chunks are skipped
    unread (seeked over), the others copied as they are. Any other file is returned as it is."""
    if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        file.seek(0)
        return file
    out = io.BytesIO(PNG_SIGNATURE)
    out.seek(0, os.SEEK_END)
    while len(head := file.read(8)) == 8:
        length, kind = struct.unpack(">I4s", head)
        if kind in PNG_TEXT_CHUNKS:
            file.seek(length + 4, os.SEEK_CUR)  # its data and CRC
            continue
        out.write(head + file.read(length + 4))
        if kind == b"IEND":
            break
    else:
        out.write(head)  # a truncated file stays truncated: PIL says so
    out.seek(0)
    return out


def _decode(file, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_without_png_text(file))
            w, h = img.size
            if w * h > MAX_INPUT_PIXELS:
                raise UserError(f"{name} is {w}x{h} pixels ({_megapixels(w * h)}); the limit is "
                                f"{_megapixels(MAX_INPUT_PIXELS)}: downscale it before sending.")
            img.load()
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = _megapixels(int(found.group(1))) if found else "too large"
        raise UserError(f"{name} is {size}; the limit is {_megapixels(MAX_INPUT_PIXELS)}: downscale it before "
                        "sending.") from None
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image file PIL can read: send a PNG, JPEG or WebP.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        log.info("%s: PIL could not decode it (%s)", name, type(exc).__name__)
        raise UserError(f"{name} could not be decoded; the file may be truncated or corrupt: send it again.") from None
    return img


def _megapixels(pixels: int) -> str:
    """Pixels in MP, with as many decimals as it takes to tell it from the limit (64.008 MP, 400 MP)."""
    return f"{pixels / 1e6:.3f}".rstrip("0").rstrip(".") + " MP"


def _checked(img: Image.Image, name: str) -> Image.Image:
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


def load_image(source, name: str = "image") -> Image.Image:
    """An RGB image, EXIF orientation applied, alpha flattened onto white. source: a Delivered file, a path or a PIL
    image."""
    img = _to_8bit(_open(source, name))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_mask(source, size: tuple[int, int]) -> Image.Image:
    """A greyscale mask (white = repaint), resized to `size` if it differs. source: as load_image's."""
    mask = _to_8bit(_open(source, "mask"))
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
