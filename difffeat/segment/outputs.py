"""Writing segmentation results: palette label PNG, overlay PNG, per-class heat maps, JSON, COCO RLE."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..images import ImageInput, to_rgb
from ..io import write_bytes, write_json
from .segmenter import SegmentationResult

__all__ = ["palette", "colorize", "overlay", "save_result", "to_coco_results", "coco_entries"]


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map ``[n, 3]`` uint8 (0 = black background, 255 = white 'ignore')."""
    colors = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors[i] = (r, g, b)
    return colors


def colorize(labels: np.ndarray) -> Image.Image:
    """8-bit palette PNG image of a label map (pixel values are the labels)."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette().ravel().tolist())
    return img


def overlay(image: ImageInput, labels: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The image with class colours blended over labelled (non-background) pixels."""
    rgb = np.asarray(to_rgb(image).convert("RGB").resize(labels.shape[::-1]), dtype=np.float32)
    colors = palette()[labels].astype(np.float32)
    mask = (labels > 0)[..., None]
    out = np.where(mask, (1 - alpha) * rgb + alpha * colors, rgb)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _save_png(path: Path, img: Image.Image) -> None:
    write_bytes(path, lambda tmp: img.save(tmp, format="PNG"))


def save_result(
    result: SegmentationResult, image: ImageInput, out_dir: str | os.PathLike, stem: str, heatmaps: bool = False
) -> dict[str, Path]:
    """Write ``<stem>_labels.png`` (palette, 0 = background, i = i-th class), ``<stem>_overlay.png``,
    ``<stem>.json`` and optionally ``<stem>_heat_<class>.png``, each atomically."""
    out = Path(out_dir)
    paths = {"labels": out / f"{stem}_labels.png", "overlay": out / f"{stem}_overlay.png", "json": out / f"{stem}.json"}
    _save_png(paths["labels"], colorize(result.labels))
    _save_png(paths["overlay"], overlay(image, result.labels))
    if heatmaps:
        for cls in result.classes:
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in cls)
            heat = (result.heatmap(cls) * 255).astype(np.uint8)
            paths[f"heat_{cls}"] = out / f"{stem}_heat_{safe}.png"
            _save_png(paths[f"heat_{cls}"], Image.fromarray(heat, mode="L"))
    scores = {cls: float(result.class_maps[label - 1].max()) for cls, label in result.class_index.items()}
    write_json(paths["json"], {**result.to_json(), "class_scores": scores})  # last: its presence marks the image done
    return paths


def to_coco_results(result: SegmentationResult, image_id: int, category_ids: dict[str, int]) -> list[dict[str, Any]]:
    """COCO results entries (one per predicted class, RLE segmentation via pycocotools)."""
    scores = {cls: float(result.class_maps[label - 1].max()) for cls, label in result.class_index.items()}
    return coco_entries(result.labels, result.class_index, scores, image_id, category_ids)


def coco_entries(labels: np.ndarray, class_index: dict[str, int], class_scores: dict[str, float], image_id: int,
                 category_ids: dict[str, int]) -> list[dict[str, Any]]:
    """COCO results entries of a label map ``uint8 [H, W]``: one per class present (RLE via pycocotools),
    scored by the class's best map value."""
    from pycocotools import mask as mask_utils

    entries = []
    for cls, label in class_index.items():
        binary = np.asfortranarray((labels == label).astype(np.uint8))
        if not binary.any() or cls not in category_ids:
            continue
        rle = mask_utils.encode(binary)
        rle["counts"] = rle["counts"].decode("ascii")
        entries.append({
            "image_id": int(image_id),
            "category_id": int(category_ids[cls]),
            "segmentation": rle,
            "score": float(class_scores[cls]),
        })
    return entries
