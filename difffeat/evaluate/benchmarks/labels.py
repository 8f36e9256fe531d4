"""Label files of the benchmarks -> class ids 0..K (0 = background), with the published id maps and void
handling (``configs/datasets/<name>.json``, key ``labels``). An id the map does not know is an error
naming the file, never a silent background."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DatasetError

__all__ = ["lookup_table", "apply_table", "rgb_to_panoptic_id", "published_present_order"]


def lookup_table(labels: dict[str, Any]) -> np.ndarray:
    """``lut[raw id] = class`` (int64; -1 = an id outside the map) for the table-driven kinds:

    * ``index``: ids 0..max_class are classes; ``to_background`` ids (VOC's 255) count as 0.
    * ``context-459``: raw Pascal-Context ids 0..459; the i-th of ``raw_ids`` is class i+1, every other id 0.
    * ``cityscapes-labelids``: labelIds 0..33 -> ``label_ids[id]`` (0 = not evaluated -> background).
    * ``cocostuff-coarse``: as published, pixel value v in 1..182 is fine class v-1 -> its coarse class + 1,
      then the classes of ``merge`` (15 -> 3 food, 16 -> 4 furniture); 0 and 255 -> 0.
    """
    kind = labels["kind"]
    if kind == "index":
        lut = np.full(256, -1, np.int64)
        lut[: labels["max_class"] + 1] = np.arange(labels["max_class"] + 1)
        lut[list(labels["to_background"])] = 0
    elif kind == "context-459":
        lut = np.zeros(labels["max_raw"] + 1, np.int64)
        lut[np.asarray(labels["raw_ids"])] = np.arange(1, len(labels["raw_ids"]) + 1)
    elif kind == "cityscapes-labelids":
        lut = np.asarray(labels["label_ids"], np.int64)
    elif kind == "cocostuff-coarse":
        lut = np.full(256, -1, np.int64)
        coarse = np.asarray(labels["fine_to_coarse"], np.int64) + 1
        for src, dst in labels["merge"].items():
            coarse[coarse == int(src)] = dst
        lut[1 : len(coarse) + 1] = coarse
        lut[list(labels["to_background"])] = 0
    else:
        raise ValueError(f"no lookup table for label kind {kind!r}")
    return lut


def apply_table(raw: np.ndarray, lut: np.ndarray, path: str | Path) -> np.ndarray:
    """``lut[raw]`` as uint8; ids outside the table (or mapped to -1) raise a DatasetError naming ``path``."""
    raw = np.asarray(raw)
    values = _values(raw)
    bad = [int(v) for v in values if v < 0 or v >= len(lut) or lut[int(v)] < 0]
    if bad:
        known = np.flatnonzero(lut >= 0)
        raise DatasetError(f"label {str(path)!r} holds id(s) {bad[:5]} outside the dataset's id map (known ids "
                           f"{int(known.min())}..{int(known.max())}); is this the right dataset and label file?")  # fmt: skip
    return lut[raw].astype(np.uint8)


def _values(a: np.ndarray) -> np.ndarray:
    """The distinct values of an id map, ascending (a histogram for 8/16-bit ids: no sort of every pixel)."""
    if a.dtype.kind == "u" and a.dtype.itemsize <= 2 and a.size:
        return np.flatnonzero(np.bincount(a.reshape(-1)))
    return np.unique(a)


def rgb_to_panoptic_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG ``[H, W, 3]`` -> segment ids ``R + 256 G + 256^2 B`` (the panopticapi encoding)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def published_present_order(gt: np.ndarray) -> list[int]:
    """The classes of a label map other than 0 in the order the published captioner iterates them.

    The published code adds every pixel's class, in raster order, to a Python set, removes 0 and makes a
    list; its "missing class" step iterates a set built from that list. A CPython set's order depends on
    the order its distinct members were first added, so the same set is built here from the classes in
    order of first appearance (duplicates never change a set)."""
    flat = np.asarray(gt).reshape(-1)
    first = {int(v): int(np.argmax(flat == v)) for v in _values(flat)}  # first raster position of each class
    seen: set[int] = set()
    for v in sorted(first, key=first.get):
        seen.add(v)
    seen.discard(0)
    return list(seen)


def first_occurrence(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))
