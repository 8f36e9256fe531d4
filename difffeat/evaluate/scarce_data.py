"""Labelled image sets for label-scarce segmentation: the ddpm-segmentation layout, or images + label PNGs.

* ddpm-segmentation (Horse-21, Bedroom-28, ... as yandex-research/ddpm-segmentation ships them):
  ``ROOT/real/train`` and ``ROOT/real/test`` (or ``ROOT/train``, ``ROOT/test``) hold images and, next to each,
  ``<stem>.npy`` (an ``[H, W]`` integer label map, 255 = ignore); images are listed recursively in name order.
* a folder of images and a folder of ``<stem>.png`` label maps (single channel, pixel = class, 255 = ignore);
  every labelled image joins the pool that the random splits divide.

Every label is read and range-checked when the set is opened, before any model loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError, InvalidOptionError

__all__ = ["LabelledImage", "read_label",
           "label_grid", "DDPM_SEGMENTATION_CLASSES"]

#: label count of the ddpm-segmentation datasets (the published protocol's ``number_class``)
DDPM_SEGMENTATION_CLASSES = {"horse_21": 21, "bedroom_28": 29, "ffhq_34": 34, "cat_15": 15, "celeba_19": 19,
                             "ade_bedroom_30": 30}
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".gif")


@dataclass(frozen=True)
class LabelledImage:
    """One image and its label map file (``.npy`` or single-channel ``.png``)."""

    stem: str  # unique within the set (names the cached feature file)
    image: str
    label: str


@dataclass
class LabelledSet:
    """Images with label maps: ``items[:n_train]`` is the given training part (all of them for plain folders)."""

    items: list[LabelledImage]
    n_train: int
    num_classes: int
    source: dict

    def __len__(self) -> int:
        return len(self.items)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """An ``[H, W]`` uint8 label map from ``.npy`` or a single-channel PNG."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path)
        else:
            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise DatasetError(f"label {str(path)!r} is {im.mode}; label PNGs must be single-channel (mode L or "
                                       "P) with class indices as pixel values, not colours")
                arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read label {str(path)!r}: {exc}") from None
    if arr.ndim != 2:
        raise DatasetError(f"label {str(path)!r} has shape {arr.shape}; a label map is [H, W]")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DatasetError(f"label {str(path)!r} holds values outside 0..255")
    return arr.astype(np.uint8)


def label_grid(hw: tuple[int, int], label_size: int | None) -> tuple[int, int]:
    """The ``(H, W)`` grid labels and features are compared on: the label's own size, or long side
    ``label_size`` with the aspect kept (the reference: 256 x 256 for its square datasets)."""
    h, w = hw
    if label_size is None:
        return h, w
    s = label_size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def resize_label(label: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``grid`` (OpenCV's INTER_NEAREST, as the reference)."""
    if label.shape == tuple(grid):
        return label
    import cv2

    return cv2.resize(label, (grid[1], grid[0]), interpolation=cv2.INTER_NEAREST)


def _check(items: Sequence[LabelledImage], num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= 255:
        raise InvalidOptionError(f"the number of classes must be an integer in 2..255, got {num_classes!r}")
    for it in items:
        values = np.unique(read_label(it.label))
        bad = [int(v) for v in values if v >= num_classes and v != 255]
        if bad:
            raise DatasetError(f"label {it.label!r} holds class value(s) {bad[:5]} but there are {num_classes} classes "
                               f"(0..{num_classes - 1}, 255 = ignore); pass the right --num-classes or fix the label")
        try:
            with Image.open(it.image) as im:
                im.size  # noqa: B018 - opens the header
        except OSError as exc:
            raise DatasetError(f"cannot read image {it.image!r} ({exc})") from None


def _images_under(folder: Path) -> list[Path]:
    out: list[Path] = []
    for entry in sorted(os.listdir(folder)):
        p = folder / entry
        if p.is_dir():
            out += _images_under(p)
        elif p.suffix.lower() in _IMAGE_EXT:
            out.append(p)
    return out


def ddpm_segmentation(root: str | os.PathLike, num_classes: int | None = None) -> LabelledSet:
    """The ddpm-segmentation layout under ``root`` (see the module docstring); ``num_classes`` defaults to
    the dataset's own (:data:`DDPM_SEGMENTATION_CLASSES`, from the folder name)."""
    root = Path(root)
    base = next((b for b in (root / "real", root) if (b / "train").is_dir() and (b / "test").is_dir()), None)
    if base is None:
        raise DatasetError(f"{str(root)!r} is not a ddpm-segmentation dataset: expected {str(root / 'real' / 'train')!r} "
                           "and .../test folders of images with <stem>.npy labels")
    if num_classes is None:
        name = next((p.name for p in (root, *root.parents) if p.name in DDPM_SEGMENTATION_CLASSES), None)
        if name is None:
            raise InvalidOptionError(f"cannot tell the number of classes of {str(root)!r}; pass --num-classes "
                                     f"(known datasets: {', '.join(f'{k}={v}' for k, v in DDPM_SEGMENTATION_CLASSES.items())})")
        num_classes = DDPM_SEGMENTATION_CLASSES[name]
    parts = {}
    for split in ("train", "test"):
        items = []
        for p in _images_under(base / split):
            label = p.with_suffix(".npy")
            if not label.is_file():
                raise DatasetError(f"image {str(p)!r} has no label {label.name!r} next to it")
            items.append(LabelledImage(f"{split}-{p.relative_to(base / split).with_suffix('').as_posix().replace('/', '-')}",
                                       str(p), str(label)))
        if not items:
            raise DatasetError(f"no images in {str(base / split)!r}")
        parts[split] = items
    items = parts["train"] + parts["test"]
    _check(items, num_classes)
    return LabelledSet(items, len(parts["train"]), num_classes, {"ddpm_segmentation": str(root.resolve())})


def image_label_folders(images: str | os.PathLike, labels: str | os.PathLike, num_classes: int) -> LabelledSet:
    """Images in ``images`` with ``labels/<stem>.png`` (or ``.npy``) label maps; images without a label are
    left out, a label without an image is an error."""
    images, labels = Path(images), Path(labels)
    for folder, what in ((images, "image"), (labels, "label")):
        if not folder.is_dir():
            raise DatasetError(f"{what} folder not found: {str(folder)!r}")
    by_stem = {}
    for p in sorted(images.iterdir()):
        if p.suffix.lower() in (*_IMAGE_EXT, ".bmp", ".webp"):
            by_stem.setdefault(p.stem, p)
    items = []
    for lab in sorted(q for q in labels.iterdir() if q.suffix.lower() in (".png", ".npy")):
        if lab.stem not in by_stem:
            raise DatasetError(f"label {str(lab)!r} has no image {lab.stem}.* in {str(images)!r}")
        items.append(LabelledImage(lab.stem, str(by_stem[lab.stem]), str(lab)))
    if len(items) < 2:
        raise DatasetError(f"need at least 2 labelled images (one to train, one to test), found {len(items)} label "
                           f"file(s) in {str(labels)!r}")
    _check(items, num_classes)
    return LabelledSet(items, len(items), num_classes, {"images": str(images.resolve()), "labels": str(labels.resolve())})
