"""Image normalisation: every accepted input becomes RGB; bad input gets a specific message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.errors import InvalidImageError
from difffeat.images import target_size, to_rgb


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_and_palette_become_rgb():
    assert to_rgb(Image.new("L", (16, 16), 7)).getpixel((3, 3)) == (7, 7, 7)
    assert to_rgb(Image.new("P", (16, 16))).mode == "RGB"


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    arr = np.full((16, 16), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    rgb = to_rgb(path)
    assert rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 0)


def test_numpy_and_tensor_inputs():
    arr = np.zeros((10, 12, 3), dtype=np.float32)
    arr[..., 1] = 1.0
    assert to_rgb(arr).getpixel((0, 0)) == (0, 255, 0)
    t = torch.zeros(3, 10, 12)
    t[2] = 1.0
    assert to_rgb(t).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 10, 3), dtype=np.uint8), "zero size"),
        (np.zeros((1, 1, 3), dtype=np.uint8), "at least"),
        (np.full((10, 10, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((10, 10, 5), dtype=np.uint8), "unsupported array shape"),
        (12345, "unsupported image type"),
    ],
)
def test_bad_inputs_have_specific_messages(bad, message):
    with pytest.raises(InvalidImageError, match=message):
        to_rgb(bad)


def test_huge_images_are_downscaled_with_a_warning():
    big = Image.new("RGB", (8000, 8000))
    with pytest.warns(UserWarning, match="downscaled"):
        out = to_rgb(big)
    assert max(out.size) < 8000


def test_target_size_keeps_aspect_and_multiple():
    assert target_size((640, 480), 512, 64) == (512, 384)
    assert target_size((100, 1000), 512, 64) == (64, 512)
    assert target_size((640, 480), 512, 64, square=True) == (512, 512)
