"""Pictures of segmentation results (difffeat.segment.outputs): palette, overlay, enlargement, heat maps."""

from __future__ import annotations

import numpy as np
from PIL import Image

from difffeat.segment.outputs import CLASS_COLORS, VIRIDIS, colorize, display_scale, enlarge, heatmap_image, overlay, palette


def _lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB of sRGB uint8 colours [n, 3] (D65), written out here independently of the library."""
    c = rgb.astype(np.float64) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def test_palette_is_distinct_and_light_enough_to_blend():
    p = palette()
    assert (p[0] == 0).all() and (p[255] == 255).all()
    classes = np.array(CLASS_COLORS, dtype=np.uint8)
    assert np.array_equal(p[1 : len(classes) + 1], classes)
    lab = _lab(classes)
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(len(lab)) * 1e9
    assert dist.min() > 15, "two class colours are hard to tell apart"
    assert lab[:, 0].min() > 30, "a class colour is too dark to show over an image"  # navy is L=13, olive L=52
    assert np.array_equal(colorize(np.array([[0, 3]], np.uint8)).convert("RGB").getpixel((1, 0)), p[3])


def test_enlarge_is_nearest_by_an_integer_factor():
    assert display_scale((64, 64)) == 8 and display_scale((256, 200)) == 2 and display_scale((1024, 768)) == 1
    src = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    big = np.asarray(enlarge(src, 5))
    assert big.shape == (15, 20)
    np.testing.assert_array_equal(big, np.kron(np.asarray(src), np.ones((5, 5), np.uint8)))


def test_overlay_outlines_regions_in_the_exact_label_colour_and_tints_inside():
    image = np.full((10, 10, 3), 100, np.uint8)
    labels = np.zeros((10, 10), np.uint8)
    labels[2:8, 2:8] = 1
    out = np.asarray(overlay(image, labels, alpha=0.5, scale=3))
    assert out.shape == (30, 30, 3)
    small = out[::3, ::3].astype(int)
    color = palette()[1].astype(int)
    np.testing.assert_array_equal(small[2, 4], color)  # boundary pixel: exact
    np.testing.assert_array_equal(small[4, 4], np.round((100 + color) / 2))  # interior: 50% tint
    np.testing.assert_array_equal(small[0, 0], [100, 100, 100])  # background untouched


def test_heatmap_uses_the_colour_scale_and_draws_a_bar():
    scores = np.array([[0.0, 1.0], [0.5, 0.25]])
    plain = np.asarray(heatmap_image(scores, scale=4, bar=False))
    assert plain.shape == (8, 8, 3)
    np.testing.assert_array_equal(plain[0, 0], VIRIDIS[0])
    np.testing.assert_array_equal(plain[0, 4], VIRIDIS[-1])
    np.testing.assert_array_equal(plain[4, 0], VIRIDIS[2])
    np.testing.assert_array_equal(plain[4, 4], VIRIDIS[1])
    barred = heatmap_image(scores, scale=4)
    assert barred.size[0] > 8 and barred.size[1] == 8
