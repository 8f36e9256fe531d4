"""Keypoint pairs of the shapes world, for semantic correspondence: the same shape class drawn twice, at
other positions, sizes and colours, on other backgrounds, with known corresponding keypoints.

Keypoints are the shape's centre and, for polygons, its corners (the star's five tips, the cross's twelve
corners); a circle or ring adds its top, right, bottom and left extremes. Shapes are not rotated, so keypoint
k of one image corresponds to keypoint k of the other. Every pair is a pure function of ``(split, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUND_KINDS, COLOURS, MIN_CONTRAST, SHAPE_CLASSES, SPLITS, _background, _colour_distance, _POLYGONS, _shape_mask

__all__ = ["ShapePair", "shape_pair", "shape_keypoints"]


@dataclass(frozen=True)
class ShapePair:
    """Two images of one shape class with corresponding keypoints ``(x, y)`` and the target's box."""

    class_name: str
    source: Image.Image
    target: Image.Image
    source_xy: tuple[tuple[float, float], ...]
    target_xy: tuple[tuple[float, float], ...]
    target_bbox: tuple[int, int, int, int]  # left, top, right, bottom (inclusive pixel bounds)


def shape_keypoints(cls: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Centre plus corners (polygons) or the four extremes (circle, ring) of an unrotated shape."""
    pts = [(cx, cy)]
    if cls in ("circle", "ring"):
        pts += [(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)]
    elif cls == "star":
        pts += [(cx + radius * x, cy + radius * y) for k, (x, y) in enumerate(_POLYGONS[cls]) if k % 2 == 0]
    elif cls != "heart":
        pts += [(cx + radius * x, cy + radius * y) for x, y in _POLYGONS[cls]]
    return pts


def _draw(rng: np.random.Generator, cls: str, size: int):
    bg_kind = BACKGROUND_KINDS[int(rng.integers(2))]  # flat or gradient: corners stay visible
    bg_colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    img, span = _background(bg_kind, bg_colour, rng, size)
    colours = [c for c in COLOURS if min(_colour_distance(COLOURS[c], b) for b in span) >= MIN_CONTRAST]
    colour = colours[int(rng.integers(len(colours)))]
    s = size / 64
    radius = float(rng.uniform(9.0, 20.0)) * s
    cx, cy = (float(rng.uniform(radius + 1, size - radius - 1)) for _ in range(2))
    mask = _shape_mask(cls, cx, cy, radius, 0.0, size)
    img[mask] = COLOURS[colour]
    ys, xs = np.nonzero(mask)
    kps = [(min(max(x, 0.0), size - 1.0), min(max(y, 0.0), size - 1.0)) for x, y in shape_keypoints(cls, cx, cy, radius)]
    image = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    return image, kps, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def shape_pair(split: str, index: int, size: int = 64) -> ShapePair:
    """Pair ``index`` of ``split``: its class cycles through :data:`SHAPE_CLASSES`."""
    rng = np.random.default_rng([SPLITS[split] + index, 31])
    cls = SHAPE_CLASSES[index % len(SHAPE_CLASSES)]
    a, ka, _ = _draw(rng, cls, size)
    b, kb, box = _draw(rng, cls, size)
    return ShapePair(cls, a, b, tuple(ka), tuple(kb), box)


