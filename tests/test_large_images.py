"""Inputs larger than the ~16 MP that difffeat decodes at (:data:`difffeat.images.MAX_PIXELS`) are downscaled on
load, but their label maps are written at the input's own size: the decision made at the loaded size, enlarged
nearest. The default suite lowers the cap to test this on small images; the slow test uses a real 10000 x
10000 px file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

import difffeat
from difffeat import images


def _scene(size: tuple[int, int]) -> Image.Image:
    """A dark image with a large yellow square (what the shapes model calls a square) in its middle."""
    w, h = size
    img = Image.new("RGB", size, (30, 30, 30))
    ImageDraw.Draw(img).rectangle([w * 3 // 10, h * 3 // 10, w * 7 // 10, h * 7 // 10], fill=(230, 200, 40))
    return img


@pytest.fixture
def small_cap(monkeypatch):
    """Inputs above 64 x 64 px count as huge (to_rgb downscales them), as 16 MP inputs do by default."""
    monkeypatch.setattr(images, "MAX_PIXELS", 64 * 64)
    return 64 * 64


def test_a_downscaled_input_keeps_its_size_for_the_outputs(small_cap):
    with pytest.warns(UserWarning, match="downscaled"):
        rgb = images.to_rgb(_scene((240, 160)))
    assert rgb.size == images.loaded_size((240, 160)) and rgb.size[0] * rgb.size[1] <= small_cap
    assert images.original_size(rgb) == (240, 160)
    assert images.original_size(images.to_rgb(rgb)) == (240, 160)  # an RGB image of the right size passes as is
    assert images.original_size(Image.new("RGB", (20, 10))) == (20, 10)
    assert images.original_size(rgb.crop((0, 0, 20, 10))) == (20, 10)  # a crop is another image


def test_labels_of_a_downscaled_input_are_at_its_own_size(small_cap, shapes_backbone):
    seg = difffeat.Segmenter(shapes_backbone)
    big = _scene((240, 160))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = seg(big, ["square"])
        loaded = seg(Image.fromarray(np.asarray(images.to_rgb(big))), ["square"])  # the same pixels, no original size
    assert result.labels.shape == (160, 240)
    assert loaded.labels.shape == images.loaded_size((240, 160))[::-1]
    # the same decision at the loaded size (same pixels through the same kernels), enlarged nearest
    want = np.asarray(Image.fromarray(loaded.labels).resize((240, 160), Image.NEAREST))
    np.testing.assert_array_equal(result.labels, want)
    assert (result.labels == 1).mean() > 0.05  # the square is found, so the comparison is not of empty maps
    assert result.with_tau(result.settings["tau"] + 0.05).labels.shape == (160, 240)
    assert result.to_json()["size"] == [160, 240]


def test_a_run_writes_labels_at_the_input_size_and_the_overlay_at_most_at_the_cap(small_cap, tmp_path):
    from difffeat.runs import commands

    _scene((240, 160)).save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        commands.segment([tmp_path / "big.png"], "square", out_dir=tmp_path / "out", num_workers=0, heatmaps=True)
    assert Image.open(tmp_path / "out" / "big_labels.png").size == (240, 160)
    assert Image.open(tmp_path / "out" / "big_overlay.png").size == images.loaded_size((240, 160))
    assert Image.open(tmp_path / "out" / "big_heat_square.png").size == images.loaded_size((240, 160))
    assert json.loads((tmp_path / "out" / "big.json").read_text())["size"] == [160, 240]


@pytest.mark.slow
def test_a_10000_px_image_is_labelled_at_10000_px(tmp_path):
    """A real 100 MP input (mostly uniform, so the PNG is small): labels 10000 x 10000, the square found.
    About 15 s of CPU and 2 GB of memory."""
    from difffeat.runs import commands

    _scene((10000, 10000)).save(tmp_path / "huge.png", compress_level=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        commands.segment([tmp_path / "huge.png"], "square", out_dir=tmp_path / "out", num_workers=0)
        labels = Image.open(tmp_path / "out" / "huge_labels.png")
    assert labels.size == (10000, 10000)
    assert Image.open(tmp_path / "out" / "huge_overlay.png").size == (4096, 4096)
    square = np.asarray(labels)[3000:7000:10, 3000:7000:10]
    assert (square == 1).mean() > 0.8
