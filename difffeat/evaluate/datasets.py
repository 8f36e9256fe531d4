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

from ..errors import DatasetError
from ..images import to_rgb
from ..segment.prompts import check_classes

__all__ = ["read_coco"]

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


def read_coco(annotations: str | os.PathLike) -> dict:
    """A COCO instances file, checked: a JSON object with ``images`` (each with ``id``, ``file_name``,
    ``height``, ``width``), ``categories`` (each with ``id``, ``name``) and ``annotations`` whose
    ``image_id``/``category_id`` exist. Errors name the file and the entry."""
    import json

    ann = Path(annotations)
    if not ann.is_file():
        raise DatasetError(f"COCO annotation file not found: {str(ann)!r}")
    try:
        data = json.loads(ann.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{str(ann)!r} is not valid JSON ({exc}); pass a COCO instances annotation file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{str(ann)!r} holds a JSON {type(data).__name__}, not a COCO object with "
                           "'images', 'annotations' and 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{str(ann)!r} has no {key!r} list; a COCO instances file needs 'images', "
                               "'annotations' and 'categories'")
    data.setdefault("annotations", [])

    def entry(key: str, i: int, d, fields: dict[str, type]) -> None:
        where = f"{str(ann)!r}: {key}[{i}]" + (f" (id {d.get('id')!r})" if isinstance(d, dict) and "id" in d else "")
        if not isinstance(d, dict):
            raise DatasetError(f"{where} is not an object")
        for f, typ in fields.items():
            if not isinstance(d.get(f), typ) or isinstance(d.get(f), bool):
                raise DatasetError(f"{where} has no valid {f!r} ({typ.__name__} expected, got {d.get(f)!r})")

    for i, d in enumerate(data["images"]):
        entry("images", i, d, {"id": int, "file_name": str, "height": int, "width": int})
    for i, d in enumerate(data["categories"]):
        entry("categories", i, d, {"id": int, "name": str})
    if not data["categories"]:
        raise DatasetError(f"{str(ann)!r} has an empty 'categories' list: nothing to segment")
    for key in ("id", "name"):  # pycocotools would keep one of each and drop the other's class silently
        values = [d[key] for d in data["categories"]]
        dupes = sorted({v for v in values if values.count(v) > 1}, key=str)
        if dupes:
            owners = [d["name"] if key == "id" else d["id"] for d in data["categories"] if d[key] == dupes[0]]
            raise DatasetError(f"{str(ann)!r}: categories share the {key} {dupes[0]!r} ({', '.join(map(repr, owners))}); "
                               f"each category needs its own {key}")
    cats, imgs = {d["id"] for d in data["categories"]}, {d["id"] for d in data["images"]}
    for i, d in enumerate(data["annotations"]):
        entry("annotations", i, d, {"id": int, "image_id": int, "category_id": int})
        if d["category_id"] not in cats:
            raise DatasetError(f"{str(ann)!r}: annotations[{i}] (id {d['id']}) has category_id {d['category_id']}, "
                               f"which 'categories' does not define (known: {sorted(cats)[:10]})")
        if d["image_id"] not in imgs:
            raise DatasetError(f"{str(ann)!r}: annotations[{i}] (id {d['id']}) has image_id {d['image_id']}, "
                               "which 'images' does not define")
    return data


class CocoDataset:
    """COCO instances annotations -> semantic masks. Labels are contiguous in category-id order; later
    annotations overwrite earlier ones where they overlap; crowd regions are ignored (255)."""

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike) -> None:
        from pycocotools.coco import COCO

        data = read_coco(annotations)
        self.images = Path(images)
        if not self.images.is_dir():
            raise DatasetError(f"image folder not found: {str(self.images)!r}")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.classes = [c["name"] for c in cats]
        self.category_ids = {c["name"]: c["id"] for c in cats}
        self._label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.ids = sorted(self.coco.getImgIds())
        missing = [d["file_name"] for d in data["images"] if not (self.images / d["file_name"]).is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of {str(annotations)!r} missing from {str(self.images)!r}, "
                               f"e.g. {missing[0]!r}; pass the folder holding them with --images")

    def __len__(self) -> int:
        return len(self.ids)

    def image_files(self) -> list[Path]:
        """The image file of every item, in item order."""
        return [self.images / self.coco.loadImgs(i)[0]["file_name"] for i in self.ids]

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
        return EvalItem(info["file_name"], to_rgb(self.images / info["file_name"]), gt)  # a corrupt file: InvalidImageError naming it


class VocDataset:
    """VOC-style folders: ``images/<stem>.jpg|png`` and ``labels/<stem>.png`` (pixel = label, 255 ignore)."""

    def __init__(self, images: str | os.PathLike, labels: str | os.PathLike, classes: Sequence[str]) -> None:
        self.images, self.labels = Path(images), Path(labels)
        if not self.labels.is_dir():
            raise DatasetError(f"label folder not found: {str(self.labels)!r}")
        if not self.images.is_dir():
            raise DatasetError(f"image folder not found: {str(self.images)!r}")
        self.classes = list(classes)
        if not self.classes:
            raise DatasetError("a VOC-style dataset needs its class names (label i = i-th name, 0 = background)")
        check_classes(self.classes)  # a duplicate name would score pixels of one label as another class
        self.stems = sorted(p.stem for p in self.labels.glob("*.png"))
        self._image_of = {}
        for stem in self.stems:
            found = [p for p in self.images.glob(stem + ".*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp")]
            if not found:
                raise DatasetError(f"no image for label {stem}.png in {str(self.images)!r}")
            self._image_of[stem] = found[0]
        if not self.stems:
            raise DatasetError(f"no label PNGs in {str(self.labels)!r}")
        for stem in self.stems:
            self._check_label(stem)

    def _check_label(self, stem: str) -> None:
        """A label PNG is single-channel (L or P), has its image's size, and holds 0..len(classes) or 255."""
        path = self.labels / f"{stem}.png"
        try:
            with Image.open(path) as lab:
                mode, size = lab.mode, lab.size
                values = np.unique(np.asarray(lab)) if mode in ("L", "P") else None
            with Image.open(self._image_of[stem]) as im:
                image_size = im.size
        except OSError as exc:
            raise DatasetError(f"cannot read {str(path)!r} or its image ({exc})") from None
        if values is None:
            raise DatasetError(f"label {str(path)!r} is {mode}; labels must be single-channel PNGs (mode L or P) "
                               "whose pixel values are class indices, not colours")
        if size != image_size:
            raise DatasetError(f"label {str(path)!r} is {size[0]}x{size[1]} px but its image "
                               f"{self._image_of[stem].name!r} is {image_size[0]}x{image_size[1]}; they must match")
        bad = [int(v) for v in values if v != 255 and v > len(self.classes)]
        if bad:
            raise DatasetError(f"label {str(path)!r} holds value(s) {bad[:5]} but only {len(self.classes)} class "
                               f"name(s) were given (0 = background, 1..{len(self.classes)}, 255 = ignore)")

    def __len__(self) -> int:
        return len(self.stems)

    def image_files(self) -> list[Path]:
        """The image file of every item, in item order."""
        return [self._image_of[stem] for stem in self.stems]

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
        from ..errors import InvalidOptionError
        from ..shapes import world

        if split not in world.SPLITS:
            raise InvalidOptionError(f"unknown shapes split {split!r}; choose one of {', '.join(world.SPLITS)}")
        if int(n) < 1:
            raise InvalidOptionError(f"the number of shapes images must be >= 1, got {n}")
        self.world = world
        self.split, self.n, self.start = split, int(n), int(start)
        self.classes = list(world.SHAPE_CLASSES)

    def image_files(self) -> list[Path]:
        """None: the images are generated, not read from files."""
        return []

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
        raise DatasetError(f"void={void!r} is not one of {VOID} (what 255 pixels count as)")
    return VoidAsBackground(dataset) if void == "background" else dataset
