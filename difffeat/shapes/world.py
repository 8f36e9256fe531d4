"""Procedural "shapes world": 64x64 RGB scenes of coloured shapes with exact ground truth.

Every sample is a pure function of ``(split, index)``: a :class:`numpy.random.Generator` is seeded from a
split-specific, disjoint seed range, so the same call always returns the same image, mask and caption.

Scenes hold 1-4 objects from :data:`SHAPE_CLASSES` (index order fixed: 0 = background, 1..8 = shapes),
painted in order, so later objects occlude earlier ones. Placement is rejected when it would hide most of an
earlier object, and any object whose visible area ends up below :data:`MIN_VISIBLE_PX` is dropped before
anything is rendered, so the caption never names an invisible object. Only numpy and PIL are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASS_TO_INDEX", "COLOURS", "SPLITS", "MIN_VISIBLE_PX", "split_seed", "describe"]

IMAGE_SIZE = 64
#: Class names; the label of class ``SHAPE_CLASSES[i]`` in masks is ``i + 1`` (0 is background).
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
CLASS_TO_INDEX: dict[str, int] = {name: i + 1 for i, name in enumerate(SHAPE_CLASSES)}

#: Named palette (RGB). Object colours are drawn from it subject to a contrast check against the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (245, 225, 40),
    "orange": (250, 140, 20),
    "purple": (130, 40, 170),
    "pink": (250, 140, 190),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "brown": (120, 70, 30),
    "grey": (128, 128, 128),
}
BACKGROUND_KINDS: tuple[str, ...] = ("flat", "gradient", "stripes", "noise")
#: Adjective used for each background kind in captions ("" for flat).
BACKGROUND_WORDS: dict[str, str] = {"flat": "", "gradient": "gradient", "stripes": "striped", "noise": "noisy"}
MIN_VISIBLE_PX = 20
MIN_CONTRAST = 110.0  # Euclidean RGB distance between object colour and every background colour

# Disjoint seed ranges: index i of split s uses seed SPLIT_OFFSETS[s] + i, i < SPLIT_SIZE.
SPLIT_SIZE = 100_000_000
SPLITS: dict[str, int] = {"train": 0, "val": 1 * SPLIT_SIZE, "test": 2 * SPLIT_SIZE}


@dataclass(frozen=True)
class Instance:
    """One visible object: class, colour, its visible-pixel mask and bounding box ``(x, y, w, h)``."""

    class_name: str
    colour: str
    mask: np.ndarray = field(repr=False)  # bool [H, W], visible pixels only
    bbox: tuple[int, int, int, int]

    @property
    def class_index(self) -> int:
        return CLASS_TO_INDEX[self.class_name]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class ShapeSample:
    """A rendered scene with exact ground truth."""

    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    mask: np.ndarray = field(repr=False)  # uint8 [H, W]: 0 = background, else class index (1..8)
    instances: tuple[Instance, ...]  # in painting order (later occludes earlier)
    caption: str
    classes_present: tuple[str, ...]  # sorted class names
    background: str  # one of BACKGROUND_KINDS
    background_colour: str
    split: str
    index: int


def split_seed(split: str, index: int) -> int:
    """The RNG seed of sample ``index`` of ``split`` (seed ranges of the splits never overlap)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {index}")
    return SPLITS[split] + index


# ----------------------------------------------------------------------------------------------- geometry
def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart(n: int = 40) -> list[tuple[float, float]]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17.0, (y + 2.5) / 17.0))
    return pts


def _cross(w: float = 0.34) -> list[tuple[float, float]]:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.93, 0.62), (-0.93, 0.62)],
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
}


def _shape_mask(cls: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Rasterise one shape (bool [size, size]) centred at (cx, cy) with outer radius ``radius``."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if cls in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if cls == "ring":
            r_in = radius * 0.55
            draw.ellipse([cx - r_in, cy - r_in, cx + r_in, cy + r_in], fill=0)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in _POLYGONS[cls]]
        draw.polygon(pts, fill=255)
    return np.asarray(img) > 127


# ---------------------------------------------------------------------------------------------- rendering
def _colour_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Blend toward white (amount > 0) or black (amount < 0)."""
    c = np.asarray(rgb, float)
    target = 255.0 if amount > 0 else 0.0
    out = c + (target - c) * abs(amount)
    return tuple(int(round(v)) for v in np.clip(out, 0, 255))  # type: ignore[return-value]


def _background(
    kind: str, colour: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Render a background (float [H, W, 3]) and return the colours it spans (for the contrast check)."""
    base = COLOURS[colour]
    # Shade direction that stays visible: lighten dark colours, darken light ones.
    direction = 1.0 if sum(base) < 380 else -1.0
    if kind == "flat":
        return np.broadcast_to(np.asarray(base, float), (size, size, 3)).copy(), [base]
    if kind == "gradient":
        other = _shade(base, direction * 0.45)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        t = (xx * math.cos(ang) + yy * math.sin(ang)) / math.sqrt(0.5) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        img = np.asarray(base, float) * (1 - t) + np.asarray(other, float) * t
        return img, [base, other]
    if kind == "stripes":
        other = _shade(base, direction * 0.4)
        period = rng.uniform(6, 14)
        ang = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        yy, xx = np.mgrid[0:size, 0:size].astype(float)
        phase = rng.uniform(0, period)
        on = (((xx * math.cos(ang) + yy * math.sin(ang)) + phase) % period) < period / 2
        img = np.where(on[..., None], np.asarray(base, float), np.asarray(other, float))
        return img, [base, other]
    if kind == "noise":
        coarse = rng.normal(0, 1, (size // 8, size // 8))
        smooth = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BILINEAR))
        fine = rng.normal(0, 0.35, (size, size))
        field_ = np.clip(smooth + fine, -1.5, 1.5)[..., None]
        img = np.asarray(base, float) + 28.0 * field_
        span = [_shade(base, 0.17), _shade(base, -0.17)]
        return np.clip(img, 0, 255), [base, *span]
    raise ValueError(f"unknown background kind {kind!r}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(objects: list[tuple[str, str]], background: str, background_colour: str) -> str:
    """Full descriptive caption, e.g. ``"a red circle and a blue star on a striped green background"``."""
    phrases = [f"{_article(colour)} {colour} {cls}" for cls, colour in objects]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    adj = BACKGROUND_WORDS[background]
    bg_words = f"{adj} {background_colour}" if adj else background_colour
    return f"{body} on {_article(bg_words)} {bg_words} background"


def _place_objects(
    rng: np.random.Generator, n_objects: int, bg_colours: list[tuple[int, int, int]], size: int
) -> list[tuple[str, str, np.ndarray]]:
    """Choose and place objects; returns (class, colour, full mask) in painting order."""
    colour_names = [c for c in COLOURS if min(_colour_distance(COLOURS[c], b) for b in bg_colours) >= MIN_CONTRAST]
    placed: list[tuple[str, str, np.ndarray]] = []
    for _ in range(n_objects):
        for _attempt in range(12):
            cls = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
            # Distinct colours per scene where the palette allows, so touching objects stay separable.
            unused = [c for c in colour_names if c not in {col for _, col, _ in placed}] or colour_names
            colour = unused[int(rng.integers(len(unused)))]
            radius = float(rng.uniform(8.0, 17.0)) if n_objects > 1 else float(rng.uniform(10.0, 22.0))
            margin = radius * 0.7
            cx = float(rng.uniform(margin, size - margin))
            cy = float(rng.uniform(margin, size - margin))
            angle = float(rng.uniform(0, 2 * math.pi))
            m = _shape_mask(cls, cx, cy, radius, angle, size)
            if m.sum() < 4 * MIN_VISIBLE_PX:
                continue
            # Partial overlap only: every earlier object keeps >= 55% of its visible area and >= MIN px.
            ok = True
            for j, (_c, _col, prev) in enumerate(placed):
                vis = prev.copy()
                for _c2, _col2, later in placed[j + 1 :]:
                    vis &= ~later
                before = int(vis.sum())
                after = int((vis & ~m).sum())
                if after < max(MIN_VISIBLE_PX, 0.55 * before):
                    ok = False
                    break
            if ok:
                placed.append((cls, colour, m))
                break
    return placed


def sample(split: str, index: int, size: int = IMAGE_SIZE) -> ShapeSample:
    """Render sample ``index`` of ``split`` ("train", "val" or "test"); deterministic."""
    rng = np.random.default_rng(split_seed(split, index))
    bg_kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    bg_colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    bg_img, bg_span = _background(bg_kind, bg_colour, rng, size)
    n_objects = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.22, 0.13]))
    placed = _place_objects(rng, n_objects, bg_span, size)

    # Visibility: painting order; drop anything nearly hidden (placement makes this rare).
    label = np.zeros((size, size), np.int16)  # object id + 1
    for k, (_cls, _col, m) in enumerate(placed):
        label[m] = k + 1
    keep = [k for k in range(len(placed)) if int((label == k + 1).sum()) >= MIN_VISIBLE_PX]
    if len(keep) != len(placed):
        placed = [placed[k] for k in keep]
        label[:] = 0
        for k, (_cls, _col, m) in enumerate(placed):
            label[m] = k + 1

    img = bg_img
    mask = np.zeros((size, size), np.uint8)
    instances = []
    for k, (cls, colour, _m) in enumerate(placed):
        vis = label == k + 1
        img[vis] = COLOURS[colour]
        mask[vis] = CLASS_TO_INDEX[cls]
        ys, xs = np.nonzero(vis)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        instances.append(Instance(cls, colour, vis, bbox))
    image = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    caption = describe([(i.class_name, i.colour) for i in instances], bg_kind, bg_colour)
    present = tuple(sorted({i.class_name for i in instances}))
    return ShapeSample(image, mask, tuple(instances), caption, present, bg_kind, bg_colour, split, index)
