"""Reading images and masks: every common mode, EXIF orientation, and clear errors for bad files."""

import io

import numpy as np
import pytest
from PIL import Image

from flux import images as image_io
from flux.errors import UserError
from tests.helpers import images


def test_exif_orientation_is_honoured(tmp_path):
    img = images.gradient(640, 320)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    loaded = image_io.load_image(path)
    assert loaded.size == (320, 640)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16", "I", "F", "1"])
def test_modes_become_rgb(tmp_path, mode):
    base = images.gradient(256, 256)
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        assert img.mode == "I;16"
        fmt = "png"
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
        fmt = "tiff"
    elif mode == "CMYK":
        img, fmt = base.convert("CMYK"), "jpeg"
    else:
        img, fmt = base.convert(mode), "png"
    path = tmp_path / f"img.{fmt}"
    img.save(path)
    loaded = image_io.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (256, 256)
    if mode in ("I;16", "I", "F", "L"):  # greyscale depth scaled, not clipped to white
        grey = np.asarray(loaded.convert("L"), dtype=np.int32)
        expected = np.asarray(base.convert("L"), dtype=np.int32)
        assert np.abs(grey - expected).max() <= 1


def test_alpha_is_flattened_onto_white(tmp_path):
    img = Image.new("RGBA", (128, 128), (10, 20, 30, 0))
    path = images.save(img, tmp_path, "clear.png")
    assert image_io.load_image(path).getpixel((5, 5)) == (255, 255, 255)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am text")
    with pytest.raises(UserError, match="not an image file"):
        image_io.load_image(path)


def test_truncated_image(tmp_path):
    buf = io.BytesIO()
    images.gradient(512, 512).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        image_io.load_image(path)


def test_tiny_image(tmp_path):
    path = images.save(Image.new("RGB", (1, 1)), tmp_path, "dot.png")
    with pytest.raises(UserError, match="at least 64"):
        image_io.load_image(path)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # A 20000x20000 PNG header over a few bytes of data.
    img = Image.new("1", (20000, 20000))
    path = tmp_path / "bomb.png"
    img.save(path, optimize=True)
    assert path.stat().st_size < 200_000
    with pytest.raises(UserError, match="image is 400 MP; the limit is 64 MP"):
        image_io.load_image(path)


def test_mask_resized_and_greyscale(tmp_path):
    mask = images.save(images.box_mask(100, 100, (0, 0, 50, 50)).convert("RGB"), tmp_path, "m.png")
    loaded = image_io.load_mask(mask, (256, 256))
    assert loaded.mode == "L" and loaded.size == (256, 256)
    assert loaded.getpixel((10, 10)) == 255 and loaded.getpixel((200, 200)) == 0


@pytest.mark.parametrize("fmt,quality", [("webp", 80), ("jpg", 95), ("png", 80)])
def test_save_formats(tmp_path, fmt, quality):
    paths = image_io.save([images.gradient(256, 256)], tmp_path, fmt, quality)
    with Image.open(paths[0]) as img:
        assert img.format == image_io.EXTENSIONS[fmt]
    assert paths[0].suffix == f".{fmt}"


def test_an_image_just_over_the_limit_says_by_how_much(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("1", (8001, 8000)).save(path, optimize=True)
    with pytest.raises(UserError, match=r"image is 64\.008 MP; the limit is 64 MP"):
        image_io.load_image(path)


def test_a_png_whose_text_chunks_unpack_past_pils_bound_is_read(tmp_path):
    """ComfyUI keeps its workflow in a compressed text chunk: one that unpacks to 3 MB (PIL refuses text over 1 MB)
    does not make the image unreadable, and its pixels are the image's."""
    from PIL import PngImagePlugin

    img = images.gradient(256, 256)
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", "{}" * 1_500_000, zip=True)
    info.add_text("prompt", "a cat")
    path = tmp_path / "comfy.png"
    img.save(path, pnginfo=info)
    assert np.array_equal(np.asarray(image_io.load_image(path)), np.asarray(img.convert("RGB")))
