"""Readers of the six GOCA benchmarks in the layout their official downloads unpack to, with the published
split, subset, order, id map and void handling (``configs/datasets/<name>.json``).

Every reader checks the folder layout, the split file and the image/label pairing when it is built (cheap:
no pixel is decoded) and :meth:`BenchmarkDataset.check_labels` decodes the labels of a run before any
model loads. Items are :class:`BenchmarkItem`: an :class:`~difffeat.evaluate.datasets.EvalItem` (name =
the image's file name, the key of the published noun lists) plus the ground-truth classes the published
captioner matches against (``caption_classes``, in its iteration order).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import DatasetError
from ...images import to_rgb
from ..datasets import EvalItem
from .labels import apply_table, lookup_table, published_present_order, rgb_to_panoptic_id
from .spec import BenchmarkSpec, benchmark_spec



@dataclass
class BenchmarkItem(EvalItem):
    #: the classes the published captioner takes as present (VOC: the XML objects; others: the label)
    caption_classes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    name: str  # the image's file name (the noun lists' key)
    image: Path
    label: Path
    extra: Path | None = None  # VOC: the annotation XML


def _first_dir(root: Path, candidates: Sequence[str]) -> Path | None:
    return next((root / c for c in candidates if (root / c).is_dir()), None)


class BenchmarkDataset:
    """Base of the readers: ``classes`` (1..K), ``len``, ``item_keys``, items, and the label checks."""

    spec: BenchmarkSpec
    #: the sub-folders (relative to the reader's base) that must exist, in the order they are looked for
    required: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"--root {str(self.root)!r} is not a folder; {self._layout_hint()}")
        self.classes = list(self.spec.classes)
        self.entries: list[Entry] = self._entries()
        if not self.entries:
            raise DatasetError(f"no {self.spec.name} images found under {str(self.root)!r}; {self._layout_hint()}")

    # -- layout
    def _layout_hint(self) -> str:
        return (f"{self.spec.name} expects {', '.join(self.spec.layout)} under --root (the official "
                f"{self.spec.archive} from {self.spec.download}, unpacked)")  # fmt: skip

    def _need(self, base: Path, rel: str) -> Path:
        p = base / rel
        if not p.exists():
            rel_root = str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
            raise DatasetError(f"--root {str(self.root)!r} is missing {rel_root!r}; " + self._layout_hint())
        return p

    def _entries(self) -> list[Entry]:
        raise NotImplementedError

    def _pair(self, images: Sequence[Path], label_of, what: str = "label") -> list[Entry]:
        out = []
        for img in images:
            lab = label_of(img)
            if not lab.is_file():
                raise DatasetError(f"image {str(img)!r} has no {what} (expected {str(lab)!r}); the {self.spec.name} "
                                   "split needs one per image: is the label archive unpacked completely?")  # fmt: skip
            out.append(Entry(img.name, img, lab))
        return out

    # -- items
    def __len__(self) -> int:
        return len(self.entries)

    def image_files(self) -> list[Path]:
        """The image file of every item, in item order."""
        return [e.image for e in self.entries]

    def item_keys(self, i: int) -> list[str]:
        name = self.entries[i].name
        return [name, Path(name).stem]

    def read_label(self, i: int) -> tuple[np.ndarray, list[int]]:
        """``(gt uint8 [H, W], caption classes)`` of item ``i``."""
        gt = self._read_gt(self.entries[i])
        return gt, published_present_order(gt)

    def _read_gt(self, entry: Entry) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, i: int) -> BenchmarkItem:
        entry = self.entries[i]
        gt, present = self.read_label(i)
        image = to_rgb(entry.image)
        if image.size != (gt.shape[1], gt.shape[0]):
            raise DatasetError(f"label {str(entry.label)!r} is {gt.shape[1]}x{gt.shape[0]} px but its image "
                               f"{str(entry.image)!r} is {image.size[0]}x{image.size[1]}; they must match")  # fmt: skip
        return BenchmarkItem(entry.name, image, gt, present)

    def check_labels(self, n: int | None = None, num_workers: int = 0) -> None:
        """Decode and map the labels of the first ``n`` items (DataLoader workers), raising the first error."""
        from torch.utils.data import DataLoader

        n = len(self) if n is None else min(int(n), len(self))
        loader = DataLoader(_LabelChecks(self, n), batch_size=1, num_workers=num_workers, collate_fn=_first)
        for message in loader:
            if message:
                raise DatasetError(message)

    def describe(self) -> dict:
        return {"dataset": self.spec.name, "root": str(self.root.resolve()), "split": self.spec.split,
                "void": self.spec.void, "n": len(self)}  # fmt: skip


def _first(batch):
    return batch[0]


class _LabelChecks:
    def __init__(self, data: BenchmarkDataset, n: int) -> None:
        self.data, self.n = data, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        try:
            self.data.read_label(i)
        except DatasetError as exc:
            return str(exc)
        return ""


def _read_png(path: Path, mode: tuple[str, ...] = ("L", "P")) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in mode:
                raise DatasetError(f"label {str(path)!r} is a {im.mode} image; expected a single-channel PNG of ids")
            return np.asarray(im)
    except OSError as exc:
        raise DatasetError(f"cannot read label {str(path)!r} ({exc})") from None


def _split_file(path: Path, root: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split file {str(path)!r} not found under --root {str(root)!r}: the published split is "
                           "VOC 2012's ImageSets/Segmentation/train.txt (in VOCtrainval_11-May-2012.tar)")  # fmt: skip
    return [s for s in path.read_text().split() if s]


class VocBenchmark(BenchmarkDataset):
    """PASCAL VOC 2012: Segmentation ``train.txt`` reversed; label 255 -> background; caption classes from
    the annotation XML."""

    spec = benchmark_spec("voc")

    def _base(self) -> Path:
        if (self.root / "VOCdevkit").is_dir():
            return self._need(self.root, "VOCdevkit/VOC2012")
        return self.root / "VOC2012" if (self.root / "VOC2012").is_dir() else self.root

    def _entries(self) -> list[Entry]:
        base = self._base()
        for rel in ("JPEGImages", "SegmentationClass", "Annotations"):
            self._need(base, rel)
        stems = list(reversed(_split_file(base / "ImageSets" / "Segmentation" / "train.txt", self.root)))
        self.lut = lookup_table(self.spec.labels)
        out = []
        for s in stems:
            img = self._need(base, f"JPEGImages/{s}.jpg")
            lab, xml = base / "SegmentationClass" / f"{s}.png", base / "Annotations" / f"{s}.xml"
            for p, what in ((lab, "label"), (xml, "annotation XML")):
                if not p.is_file():
                    raise DatasetError(f"image {str(img)!r} has no {what} (expected {str(p)!r}); every image of the "
                                       "split needs one (VOCtrainval_11-May-2012.tar holds them)")  # fmt: skip
            out.append(Entry(img.name, img, lab, xml))
        return out

    def _read_gt(self, entry: Entry) -> np.ndarray:
        return apply_table(_read_png(entry.label), self.lut, entry.label)

    def read_label(self, i: int) -> tuple[np.ndarray, list[int]]:
        entry = self.entries[i]
        try:
            names = [o.findtext("name") for o in ET.parse(entry.extra).getroot().iter("object")]
        except (ET.ParseError, OSError) as exc:
            raise DatasetError(f"cannot read annotation {str(entry.extra)!r} ({exc})") from None
        index = {c: k + 1 for k, c in enumerate(self.classes)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DatasetError(f"annotation {str(entry.extra)!r} names object {unknown[0]!r}, not a VOC class")
        return self._read_gt(entry), [index[n] for n in dict.fromkeys(names)]


class ContextBenchmark(BenchmarkDataset):
    """PASCAL Context-59: VOC 2012 Segmentation ``train.txt`` reversed, the images with a Context ``.mat``
    label (964); the 459 raw ids -> 59 classes, every other id -> background."""

    spec = benchmark_spec("context")

    def _entries(self) -> list[Entry]:
        voc = self._need(self.root, "VOCdevkit/VOC2012")
        mats = _first_dir(self.root, ("trainval", "pascal-context/trainval"))
        if mats is None:
            self._need(self.root, "trainval")
        self._need(voc, "JPEGImages")
        stems = list(reversed(_split_file(voc / "ImageSets" / "Segmentation" / "train.txt", self.root)))
        self.lut = lookup_table(self.spec.labels)
        out = []
        for s in stems:
            mat = mats / f"{s}.mat"
            if mat.is_file():  # the published subset: train images that Context labels
                out.append(Entry(f"{s}.jpg", self._need(voc, f"JPEGImages/{s}.jpg"), mat))
        return out

    def _read_gt(self, entry: Entry) -> np.ndarray:
        import scipy.io

        try:
            raw = scipy.io.loadmat(entry.label)["LabelMap"]
        except (OSError, ValueError, KeyError) as exc:
            raise DatasetError(f"cannot read Context label {str(entry.label)!r} (a .mat with 'LabelMap' expected: {exc})") from None
        return apply_table(raw.astype(np.int64), self.lut, entry.label)


class CocoObjectBenchmark(BenchmarkDataset):
    """COCO-Object: COCO panoptic val2017; thing categories -> their class, stuff segments and unlabelled
    pixels -> background, crowd segments keep their class."""

    spec = benchmark_spec("coco-object")

    def _entries(self) -> list[Entry]:
        images = self._need(self.root, "images/val2017")
        pngs = self._need(self.root, "annotations/panoptic_val2017")
        ann = self._need(self.root, "annotations/panoptic_val2017.json")
        if not pngs.is_dir():
            raise DatasetError(f"{str(pngs)!r} is not a folder: unzip annotations/panoptic_val2017.zip in place")
        try:
            data = json.loads(ann.read_text(encoding="utf-8"))
            segments = {a["file_name"]: a["segments_info"] for a in data["annotations"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{str(ann)!r} is not a COCO panoptic annotation file (a JSON with 'annotations', each "
                               f"with 'file_name' and 'segments_info': {exc!r})") from None  # fmt: skip
        labels = self.spec.labels
        self.category_class = {c: k + 1 for k, c in enumerate(labels["thing_category_ids"])}
        self.category_class.update({c: 0 for c in labels["stuff_category_ids"]})
        self.segments = segments
        files = sorted(p for p in images.iterdir() if p.suffix.lower() == ".jpg")
        out = self._pair(files, lambda p: pngs / f"{p.stem}.png")
        for e in out:
            if e.label.name not in segments:
                raise DatasetError(f"{str(ann)!r} has no annotation for {e.label.name!r} (image {e.name!r}); "
                                   "the PNG folder and the JSON must come from the same download")  # fmt: skip
        return out

    def _read_gt(self, entry: Entry) -> np.ndarray:
        ids = rgb_to_panoptic_id(_read_png(entry.label, ("RGB",)))
        lut: dict[int, int] = {0: 0}  # id 0: unlabelled
        for seg in self.segments[entry.label.name]:
            cat = seg.get("category_id")
            if cat not in self.category_class:
                raise DatasetError(f"segment {seg.get('id')} of {entry.label.name!r} has category_id {cat!r}, outside "
                                   "COCO panoptic's 133 categories (the id map); is this the panoptic val2017 file?")  # fmt: skip
            lut[int(seg["id"])] = self.category_class[cat]
        values, inverse = np.unique(ids, return_inverse=True)
        unknown = [int(v) for v in values if int(v) not in lut]
        if unknown:
            raise DatasetError(f"label {str(entry.label)!r} holds segment id(s) {unknown[:5]} that its JSON entry does "
                               "not list in 'segments_info' (ids are R + 256 G + 65536 B)")  # fmt: skip
        return np.asarray([lut[int(v)] for v in values], np.uint8)[inverse].reshape(ids.shape)


class CocoStuffBenchmark(BenchmarkDataset):
    """COCO-Stuff-27: stuffthingmaps val2017 next to the images; fine -> coarse (27), food and furniture
    merged, as published."""

    spec = benchmark_spec("coco-stuff")

    def _entries(self) -> list[Entry]:
        folder = self._need(self.root, "val2017")
        self.lut = lookup_table(self.spec.labels)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg")
        return self._pair(files, lambda p: p.with_suffix(".png"), "stuffthingmaps label")

    def _read_gt(self, entry: Entry) -> np.ndarray:
        return apply_table(_read_png(entry.label), self.lut, entry.label)


class CityscapesBenchmark(BenchmarkDataset):
    """Cityscapes gtFine val (500): labelIds -> the 19 evaluated classes, every other id -> background."""

    spec = benchmark_spec("cityscapes")

    def _entries(self) -> list[Entry]:
        images = self._need(self.root, "leftImg8bit/val")
        labels = self._need(self.root, "gtFine/val")
        self.lut = lookup_table(self.spec.labels)
        files = sorted(p for city in images.iterdir() if city.is_dir() for p in city.iterdir() if p.is_file())

        def label_of(p: Path) -> Path:
            return labels / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")

        return self._pair(files, label_of, "gtFine labelIds PNG")

    def _read_gt(self, entry: Entry) -> np.ndarray:
        return apply_table(_read_png(entry.label), self.lut, entry.label)


class Ade20kBenchmark(BenchmarkDataset):
    """ADE20K SceneParsing validation (2,000): label 0 (other) = background, 1..150 the classes."""

    spec = benchmark_spec("ade20k")

    def _entries(self) -> list[Entry]:
        base = self.root / "ADEChallengeData2016" if (self.root / "ADEChallengeData2016").is_dir() else self.root
        images = self._need(base, "images/validation")
        labels = self._need(base, "annotations/validation")
        self.lut = lookup_table(self.spec.labels)
        files = sorted(p for p in images.iterdir() if p.suffix.lower() == ".jpg")
        return self._pair(files, lambda p: labels / f"{p.stem}.png")

    def _read_gt(self, entry: Entry) -> np.ndarray:
        return apply_table(_read_png(entry.label), self.lut, entry.label)


#: ``--dataset`` name -> reader
READERS: dict[str, type[BenchmarkDataset]] = {
    "voc": VocBenchmark, "context": ContextBenchmark, "coco-object": CocoObjectBenchmark,
    "coco-stuff": CocoStuffBenchmark, "cityscapes": CityscapesBenchmark, "ade20k": Ade20kBenchmark,
}  # fmt: skip


def open_benchmark(name: str, root: str | os.PathLike) -> BenchmarkDataset:
    """The benchmark ``name`` read from ``root`` (its official layout; see ``difffeat datasets``)."""
    benchmark_spec(name)  # unknown name: the error lists the choices
    return READERS[name](root)
