"""Writing segmentation results: palette label PNG, overlay PNG, per-class heat maps, JSON, COCO RLE."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..images import ImageInput, loaded_size, to_rgb
from ..io import write_bytes, write_json
from .segmenter import SegmentationResult

__all__ = [
    "CLASS_COLORS",
    "palette",
    "label_colors",
    "colorize",
    "display_scale",
    "enlarge",
    "overlay",
    "heatmap_image",
    "save_result",
    "to_coco_results",
    "coco_entries",
]


#: class colours (label 1, 2, ...): Sasha Trubetskoy's "20 simple, distinct colors" without the dark ones
#: (maroon, navy, olive, teal, brown, grey), so that every colour still shows when blended over an image
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (220, 190, 255), (255, 250, 200), (170, 255, 195),
    (255, 215, 180),
)  # fmt: skip
#: viridis sampled at 0, 1/4, 1/2, 3/4, 1 (heat-map colour scale)
VIRIDIS: tuple[tuple[int, int, int], ...] = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def palette(n: int = 256) -> np.ndarray:
    """Label colours ``[n, 3]`` uint8: 0 = black background, 1.. = :data:`CLASS_COLORS` (repeating after
    14 classes), 255 = white 'ignore'."""
    colors = np.array([CLASS_COLORS[(i - 1) % len(CLASS_COLORS)] for i in range(n)], dtype=np.uint8)
    colors[0] = 0
    if n > 255:
        colors[255] = 255
    return colors


def label_colors(image: ImageInput, n_classes: int) -> np.ndarray:
    """Label colours ``[n_classes + 1, 3]`` uint8 that stand out on ``image``: 0 = black background, then for
    each class in turn the :data:`CLASS_COLORS` entry whose smallest RGB distance to the image's own colours
    and to the colours already picked is largest (first entry on ties), so that an outline is never drawn in
    the colour of the object it surrounds. Past ``len(CLASS_COLORS)`` classes colours repeat."""
    rgb = to_rgb(image).convert("RGB")
    rgb = rgb.resize((min(rgb.width, 128), min(rgb.height, 128)), Image.NEAREST)  # the colours, not the detail
    seen = np.unique(np.asarray(rgb, dtype=np.float64).reshape(-1, 3), axis=0)  # [k, 3]
    candidates = np.asarray(CLASS_COLORS, dtype=np.float64)  # [m, 3]
    to_image = np.sqrt(((candidates[:, None] - seen[None]) ** 2).sum(-1)).min(1)  # [m]
    picked: list[int] = []
    for _ in range(n_classes):
        free = [i for i in range(len(candidates)) if i not in picked] or list(range(len(candidates)))
        score = {i: min([to_image[i], *(np.sqrt(((candidates[i] - candidates[j]) ** 2).sum()) for j in picked)])
                 for i in free}
        picked.append(max(free, key=lambda i: (score[i], -i)))
    colors = np.zeros((n_classes + 1, 3), dtype=np.uint8)
    if picked:
        colors[1:] = candidates[picked].astype(np.uint8)
    return colors


def colorize(labels: np.ndarray, colors: np.ndarray | None = None) -> Image.Image:
    """8-bit palette PNG image of a label map (pixel values are the labels), coloured with ``colors``
    ``[k, 3]`` (default :func:`palette`)."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    table = palette().copy()
    if colors is not None:
        table[: len(colors)] = colors
    img.putpalette(table.ravel().tolist())
    return img


def display_scale(size: tuple[int, int], target: int = 512) -> int:
    """Integer enlargement factor that brings the long side of ``size`` (W, H) to about ``target`` px (1 for
    images already that large); an integer factor keeps every source pixel a square block."""
    return max(1, round(target / max(size)))


def enlarge(img: Image.Image, factor: int) -> Image.Image:
    """``img`` enlarged ``factor`` times with nearest-neighbour sampling (no new pixel values)."""
    return img if factor == 1 else img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def overlay(image: ImageInput, labels: np.ndarray, alpha: float = 0.5, scale: int = 1,
            colors: np.ndarray | None = None) -> Image.Image:
    """The image with each class colour (``colors[label]``, default :func:`palette`) blended at ``alpha`` over
    its pixels and drawn unblended on the region's boundary pixels (so the outline matches the legend
    exactly), nearest-enlarged ``scale`` times. Drawn at the labels' size, or at most ~16 MP
    (:func:`~difffeat.images.loaded_size`) for larger label maps."""
    lab = labels.astype(np.uint8)
    small = loaded_size(lab.shape[::-1])
    if small != lab.shape[::-1]:
        lab = np.asarray(Image.fromarray(lab).resize(small, Image.NEAREST))
    rgb = np.asarray(to_rgb(image).convert("RGB").resize(lab.shape[::-1], Image.NEAREST), dtype=np.float32)
    table = palette().copy()
    if colors is not None:
        table[: len(colors)] = colors
    colors = table[lab].astype(np.float32)
    out = np.where((lab > 0)[..., None], (1 - alpha) * rgb + alpha * colors, rgb)
    edge = np.zeros(lab.shape, dtype=bool)  # a labelled pixel with a differently labelled 4-neighbour
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge &= lab > 0
    out[edge] = colors[edge]
    return enlarge(Image.fromarray(out.round().clip(0, 255).astype(np.uint8)), scale)


def heatmap_image(scores: np.ndarray, scale: int = 1, bar: bool = True) -> Image.Image:
    """A score map ``[h, w]`` in [0, 1] coloured with :data:`VIRIDIS`, nearest-enlarged ``scale`` times, with a
    colour bar labelled 0 and 1 on the right when ``bar``."""
    x = np.clip(np.asarray(scores, dtype=np.float64), 0, 1) * (len(VIRIDIS) - 1)
    lo = np.minimum(x.astype(int), len(VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    stops = np.asarray(VIRIDIS, dtype=np.float64)
    img = enlarge(Image.fromarray(((1 - frac) * stops[lo] + frac * stops[lo + 1]).round().astype(np.uint8)), scale)
    if not bar:
        return img
    from PIL import ImageDraw

    w, h = img.size
    ramp = heatmap_image(np.linspace(1, 0, h)[:, None].repeat(12, 1), bar=False)
    canvas = Image.new("RGB", (w + 44, h), "white")
    canvas.paste(img, (0, 0))
    canvas.paste(ramp, (w + 6, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((w + 21, 0), "1", fill="black")
    draw.text((w + 21, h - 11), "0", fill="black")
    return canvas


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
