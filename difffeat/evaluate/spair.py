"""Keypoint-pair datasets for semantic correspondence: SPair-71k in its own layout, or a list of pairs.

* SPair-71k: ``ROOT/PairAnnotation/<split>/<pair>.json`` (``src_imname``, ``trg_imname``, ``category``,
  ``src_kps`` / ``trg_kps`` as ``[[x, y], ...]``, ``trg_bndbox`` as ``[left, top, right, bottom]``) and the
  images in ``ROOT/JPEGImages/<category>/<imname>``; splits ``trn``, ``val``, ``test``.
* a pair list (the JSON files of diffusion-hyperfeatures that the reference reads): a list of
  ``{"source_path", "target_path", "source_points", "target_points", "category", "target_bounding_box"}``
  with image paths relative to an image folder.

Opening a set checks every pair (images present, keypoints inside their images) before any model loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError, InvalidOptionError

__all__ = ["SPAIR_CATEGORIES", "SPAIR_SPLITS"]

SPAIR_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
                    "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")
SPAIR_SPLITS = ("trn", "val", "test")


@dataclass(frozen=True)
class KeypointPair:
    """Two images of one category with corresponding keypoints ``(x, y)`` in image pixels."""

    name: str
    category: str
    source: str
    target: str
    source_xy: tuple[tuple[float, float], ...]
    target_xy: tuple[tuple[float, float], ...]
    target_bbox: tuple[float, float, float, float] | None  # left, top, right, bottom


def _size(path: str, cache: dict[str, tuple[int, int]]) -> tuple[int, int]:
    if path not in cache:
        try:
            with Image.open(path) as im:
                cache[path] = im.size
        except OSError as exc:
            raise DatasetError(f"cannot read image {path!r} ({exc})") from None
    return cache[path]


def _check_pair(p: KeypointPair, where: str, sizes: dict) -> None:
    if not p.source_xy or len(p.source_xy) != len(p.target_xy):
        raise DatasetError(f"{where}: {len(p.source_xy)} source and {len(p.target_xy)} target keypoints; a pair needs "
                           "the same number (at least one) on both sides")
    for image, pts, side in ((p.source, p.source_xy, "source"), (p.target, p.target_xy, "target")):
        w, h = _size(image, sizes)
        for k, (x, y) in enumerate(pts):
            if not (0 <= x < w and 0 <= y < h):
                raise DatasetError(f"{where}: {side} keypoint {k} at (x={x:g}, y={y:g}) lies outside its image "
                                   f"{os.path.basename(image)!r} ({w}x{h} px); fix the annotation or leave the pair out")


def _points(raw, where: str, key: str) -> tuple[tuple[float, float], ...]:
    try:
        arr = np.asarray(raw, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {key} must be a list of [x, y] pairs") from None
    return tuple((float(x), float(y)) for x, y in arr)


def spair_pairs(root: str | os.PathLike, split: str = "test", categories: Sequence[str] | None = None,
                limit: int | None = None) -> list[KeypointPair]:
    """The pairs of SPair-71k's ``split`` under ``root`` (optionally only ``categories``, at most ``limit`` per
    category), checked: every requested category has pairs and images, every keypoint lies in its image."""
    root = Path(root)
    if split not in SPAIR_SPLITS:
        raise InvalidOptionError(f"unknown SPair-71k split {split!r}; choose one of {', '.join(SPAIR_SPLITS)}")
    folder = root / "PairAnnotation" / split
    if not folder.is_dir() or not (root / "JPEGImages").is_dir():
        raise DatasetError(f"{str(root)!r} is not an SPair-71k folder: expected {str(folder)!r} and "
                           f"{str(root / 'JPEGImages')!r}")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DatasetError(f"no pair annotations (*.json) in {str(folder)!r}")
    wanted = list(categories) if categories else None
    pairs: list[KeypointPair] = []
    per_cat: dict[str, int] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for f in files:
        try:
            ann = json.loads(f.read_text())
            cat = ann["category"]
            if wanted is not None and cat not in wanted:
                continue
            if limit is not None and per_cat.get(cat, 0) >= limit:
                continue
            img_dir = root / "JPEGImages" / cat
            if not img_dir.is_dir():
                raise DatasetError(f"{f.name}: category {cat!r} has no image folder {str(img_dir)!r}; the SPair-71k tree "
                                   "is incomplete (copy JPEGImages/<category>/ too)")
            pair = KeypointPair(f.stem, cat, str(img_dir / ann["src_imname"]), str(img_dir / ann["trg_imname"]),
                                _points(ann["src_kps"], f.name, "src_kps"), _points(ann["trg_kps"], f.name, "trg_kps"),
                                tuple(float(v) for v in ann["trg_bndbox"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"malformed SPair-71k pair annotation {str(f)!r}: {exc!r}") from None
        if not Path(pair.source).is_file() or not Path(pair.target).is_file():
            missing = pair.source if not Path(pair.source).is_file() else pair.target
            raise DatasetError(f"{f.name}: image {missing!r} not found")
        _check_pair(pair, f.name, sizes)
        pairs.append(pair)
        per_cat[cat] = per_cat.get(cat, 0) + 1
    if wanted is not None:
        absent = [c for c in wanted if c not in per_cat]
        if absent:
            raise DatasetError(f"no {split} pairs of categor{'y' if len(absent) == 1 else 'ies'} {', '.join(absent)} in "
                               f"{str(folder)!r}; the tree lacks them (present: {', '.join(sorted(per_cat)) or 'none'})")
    if not pairs:
        raise DatasetError(f"no pairs found in {str(folder)!r}")
    return pairs


def pair_list(file: str | os.PathLike, images: str | os.PathLike, limit: int | None = None) -> list[KeypointPair]:
    """Pairs from a list JSON (the reference's ``spair_71k_test-6.json`` form; see the module docstring)."""
    file, images = Path(file), Path(images)
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the pair list {str(file)!r}: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{str(file)!r} must hold a non-empty JSON list of pairs")
    pairs, sizes = [], {}
    for i, ann in enumerate(raw[:limit] if limit else raw):
        where = f"{file.name} entry {i}"
        try:
            pair = KeypointPair(f"{i:06d}", str(ann.get("category", "all")), str(images / ann["source_path"]),
                                str(images / ann["target_path"]), _points(ann["source_points"], where, "source_points"),
                                _points(ann["target_points"], where, "target_points"),
                                tuple(float(v) for v in ann["target_bounding_box"]) if ann.get("target_bounding_box") else None)
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{where}: malformed pair ({exc!r})") from None
        for path in (pair.source, pair.target):
            if not Path(path).is_file():
                raise DatasetError(f"{where}: image {path!r} not found")
        _check_pair(pair, where, sizes)
        pairs.append(pair)
    return pairs
