"""Output sizes: the documented table, custom rounding, sizes from input images."""

import pytest

from flux import sizes
from flux.errors import UserError

TABLE_1MP = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "3:2": (1216, 832), "2:3": (832, 1216),
    "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344),
    "9:21": (640, 1536),
}


@pytest.mark.parametrize("aspect_ratio", TABLE_1MP)
@pytest.mark.parametrize("megapixels", ["1", "0.25"])
def test_table(aspect_ratio, megapixels):
    w, h = TABLE_1MP[aspect_ratio]
    expected = (w, h) if megapixels == "1" else (w // 2, h // 2)
    assert sizes.table_size(aspect_ratio, megapixels) == expected
    assert expected[0] % 16 == 0 and expected[1] % 16 == 0


@pytest.mark.parametrize("given,expected", [
    ((1000, 600), (1008, 608)), ((257, 263), (256, 256)), ((264, 1440), (272, 1440)), ((256, 256), (256, 256)),
    ((1432, 1431), (1440, 1424)), ((1000, 1000), (1008, 1008)), ((1016, 1015), (1024, 1008)),
])
def test_custom_rounds_to_nearest_16(given, expected):
    assert sizes.custom_size(*given) == expected


@pytest.mark.parametrize("given", [(255, 512), (512, 1441), (0, 0)])
def test_custom_out_of_bounds(given):
    with pytest.raises(UserError, match="between 256 and 1440"):
        sizes.custom_size(*given)


@pytest.mark.parametrize("given,expected", [
    ((2000, 1000), (1440, 720)), ((480, 320), (480, 320)), ((320, 240), (336, 256)), ((1000, 2000), (720, 1440)),
    ((1024, 1024), (1024, 1024)), ((5000, 5000), (1440, 1440)), ((100, 100), (256, 256)), ((1440, 256), (1440, 256)),
    ((1023, 767), (1024, 768)),
])
def test_size_for_image(given, expected):
    assert sizes.size_for_image(*given) == expected


@pytest.mark.parametrize("given", [(1441, 256), (3000, 500), (256, 1500), (64, 1000)])
def test_size_for_image_too_extreme(given):
    with pytest.raises(UserError, match="aspect ratio"):
        sizes.size_for_image(*given)
