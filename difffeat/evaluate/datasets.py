"""Evaluation datasets: COCO annotations (pycocotools), VOC-style PNG label folders, and the synthetic
shapes world. Each yields images with semantic ground truth: 0 = background, i = ``classes[i-1]``,
255 = ignore."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..errors import DifffeatError
from ..images import to_rgb

__all__ = ["EvalItem", "SegDataset", "CocoDataset", "VocDataset", "ShapesDataset", "VOID", "with_void", "VoidAsBackground"]

#: what VOC boundary / COCO crowd pixels (255) count as: "ignore" (difffeat: skipped by the metrics) or
#: "background" (the published GOCA code: its VOC loader sets every label above 20 to 0)
VOID = ("ignore", "background")


@dataclass
class EvalItem:
    name: str
    image: Image.Image
    gt: np.ndarray  # uint8 [H, W]

    def present(self) -> list[int]:
        """Dataset labels present in the ground truth (no background, no ignore)."""
        return [int(v) for v in np.unique(self.gt) if v not in (0, 255)]


class SegDataset(Protocol):
    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> EvalItem: ...


def labelled_items(dataset: SegDataset) -> Iterator[tuple[EvalItem, list[int]]]:
    """``(item, labels present)`` for every item whose ground truth holds at least one class (oracle-label
    protocols skip the others: their prompt would be empty)."""
    for i in range(len(dataset)):
        item = dataset[i]
        labels = item.present()
        if labels:
            yield item, labels


class CocoDataset:
    """COCO instances annotations -> semantic masks. Labels are contiguous in category-id order; later
    annotations overwrite earlier ones where they overlap; crowd regions are ignored (255)."""

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike) -> None:
        from pycocotools.coco import COCO

        ann = Path(annotations)
        if not ann.is_file():
            raise DifffeatError(f"COCO annotation file not found: {str(ann)!r}")
        self.images = Path(images)
        if not self.images.is_dir():
            raise DifffeatError(f"image folder not found: {str(self.images)!r}")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann))
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.classes = [c["name"] for c in cats]
        self.category_ids = {c["name"]: c["id"] for c in cats}
        self._label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.ids = sorted(self.coco.getImgIds())

    def __len__(self) -> int:
        return len(self.ids)

    def item_keys(self, i: int) -> list[str]:
        """Names a per-image file may use for item ``i``: file name, stem, image id."""
        name = self.coco.loadImgs(self.ids[i])[0]["file_name"]
        return list(dict.fromkeys([name, Path(name).stem, str(self.ids[i])]))

    def __getitem__(self, i: int) -> EvalItem:
        info = self.coco.loadImgs(self.ids[i])[0]
        gt = np.zeros((info["height"], info["width"]), np.uint8)
        for ann in sorted(self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"])), key=lambda a: a["id"]):
            m = self.coco.annToMask(ann) > 0
            gt[m] = 255 if ann.get("iscrowd", 0) else self._label_of[ann["category_id"]]
        path = self.images / info["file_name"]
        if not path.is_file():
            raise DifffeatError(f"image {info['file_name']!r} of the annotations is missing from {str(self.images)!r}")
        return EvalItem(info["file_name"], to_rgb(path), gt)  # a corrupt file: InvalidImageError naming it


class VocDataset:
    """VOC-style folders: ``images/<stem>.jpg|png`` and ``labels/<stem>.png`` (pixel = label, 255 ignore)."""

    def __init__(self, images: str | os.PathLike, labels: str | os.PathLike, classes: Sequence[str]) -> None:
        self.images, self.labels = Path(images), Path(labels)
        if not self.labels.is_dir():
            raise DifffeatError(f"label folder not found: {str(self.labels)!r}")
        self.classes = list(classes)
        if not self.classes:
            raise DifffeatError("a VOC-style dataset needs its class names (label i = i-th name, 0 = background)")
        self.stems = sorted(p.stem for p in self.labels.glob("*.png"))
        self._image_of = {}
        for stem in self.stems:
            found = [p for p in self.images.glob(stem + ".*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp")]
            if not found:
                raise DifffeatError(f"no image for label {stem}.png in {str(self.images)!r}")
            self._image_of[stem] = found[0]

    def __len__(self) -> int:
        return len(self.stems)

    def item_keys(self, i: int) -> list[str]:
        """Names a per-image file may use for item ``i``: stem, image file name."""
        return [self.stems[i], self._image_of[self.stems[i]].name]

    def __getitem__(self, i: int) -> EvalItem:
        stem = self.stems[i]
        gt = np.asarray(Image.open(self.labels / f"{stem}.png"), dtype=np.uint8)
        return EvalItem(stem, to_rgb(self._image_of[stem]), gt)


class ShapesDataset:
    """``n`` generated samples of a split of the synthetic shapes world (exact ground truth)."""

    def __init__(self, split: str = "test", n: int = 300, start: int = 0) -> None:
        from ..shapes import world

        self.world = world
        self.split, self.n, self.start = split, int(n), int(start)
        self.classes = list(world.SHAPE_CLASSES)

    def __len__(self) -> int:
        return self.n

    def item_keys(self, i: int) -> list[str]:
        return [f"{self.split}-{self.start + i:06d}"]

    def __getitem__(self, i: int) -> EvalItem:
        s = self.world.sample(self.split, self.start + i)
        return EvalItem(f"{self.split}-{self.start + i:06d}", s.image, s.mask.astype(np.uint8))


class VoidAsBackground:
    """A dataset whose void pixels (255) are background (0), as the published GOCA evaluation counts them."""

    def __init__(self, dataset: SegDataset) -> None:
        self.dataset = dataset
        self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> EvalItem:
        item = self.dataset[i]
        return EvalItem(item.name, item.image, np.where(item.gt == 255, 0, item.gt).astype(np.uint8))

    def __getattr__(self, name: str):  # item_keys, category_ids ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_void(dataset: SegDataset, void: str = "ignore") -> SegDataset:
    """``dataset`` with its void pixels (255) handled as ``void`` (see :data:`VOID`)."""
    if void not in VOID:
        raise DifffeatError(f"void={void!r} is not one of {VOID} (what 255 pixels count as)")
    return VoidAsBackground(dataset) if void == "background" else dataset
