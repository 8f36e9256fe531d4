"""Image sources and loaders for dataset-scale runs.

* :func:`collect_images` / :func:`coco_images` / :func:`voc_images` list a dataset's images as
  :class:`ImageRef` (output stem + path), in a deterministic order.
* :class:`ResizedImages` decodes and resizes in DataLoader workers exactly like
  :meth:`Backbone.preprocess` (``to_rgb`` + ``resize_to_multiple``), so the model sees the same pixels.
* :class:`SizeBucketSampler` forms batches of images that resize to the same size.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DifffeatError, InvalidImageError
from ..images import loaded_size, resize_to_multiple, target_size, to_rgb, verify_image_file

__all__ = ["SizeBucketSampler"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageRef:
    """One input image: ``stem`` names its output file, ``path`` is where it is read from."""

    stem: str
    path: str


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def collect_images(sources: Sequence[str | os.PathLike]) -> list[ImageRef]:
    """Files, folders (their image files, not recursive) and glob patterns -> sorted-per-source refs.

    Explicit files are kept in the given order; a folder or glob contributes its matches sorted by name.
    """
    refs: list[ImageRef] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if _is_image(q))
            if not found:
                raise DifffeatError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {str(p)!r}")
        elif p.exists():
            found = [p]
        elif glob.has_magic(str(src)):
            found = sorted(Path(q) for q in glob.glob(str(src), recursive=True) if _is_image(Path(q)))
            if not found:
                raise DifffeatError(f"the pattern {str(src)!r} matches no image files")
        else:
            raise DifffeatError(f"image file not found: {str(p)!r}")
        refs += [ImageRef(q.stem, str(q)) for q in found]
    check_unique_stems(refs)
    return refs


def coco_images(annotations: str | os.PathLike, images: str | os.PathLike | None = None) -> list[ImageRef]:
    """The images of a COCO annotation file (sorted by image id); ``images`` defaults to ``<ann dir>/images``."""
    from ..evaluate.datasets import read_coco

    ann = Path(annotations)
    data = read_coco(ann)
    folder = Path(images) if images else ann.parent / "images"
    if not folder.is_dir():
        raise DifffeatError(f"image folder not found: {str(folder)!r} (pass the COCO images folder)")
    infos = sorted(data["images"], key=lambda d: d["id"])
    refs = [ImageRef(Path(d["file_name"]).stem, str(folder / d["file_name"])) for d in infos]
    check_unique_stems(refs)
    return refs


def voc_images(root: str | os.PathLike, split: str | None = None) -> list[ImageRef]:
    """A VOC folder: ``root/JPEGImages`` (or ``root`` itself), restricted to the stems listed in
    ``root/ImageSets/Segmentation/<split>.txt`` when ``split`` is given."""
    root = Path(root)
    folder = root / "JPEGImages" if (root / "JPEGImages").is_dir() else root
    if not folder.is_dir():
        raise DifffeatError(f"VOC folder not found: {str(root)!r}")
    by_stem = {p.stem: p for p in sorted(folder.iterdir()) if _is_image(p)}
    if split is None:
        stems = sorted(by_stem)
    else:
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise DifffeatError(f"VOC split list not found: {str(listing)!r}")
        stems = [s.strip() for s in listing.read_text().split() if s.strip()]
        missing = [s for s in stems if s not in by_stem]
        if missing:
            raise DifffeatError(f"{len(missing)} image(s) of split {split!r} missing from {str(folder)!r}, e.g. {missing[0]!r}")
    return [ImageRef(s, str(by_stem[s])) for s in stems]


def check_unique_stems(refs: Sequence[ImageRef]) -> None:
    seen: set[str] = set()
    dupes = sorted({r.stem for r in refs if r.stem in seen or seen.add(r.stem)})
    if dupes:
        raise DifffeatError(f"several input images share the file stem(s) {dupes[:5]}; outputs would collide")


def check_image_files(paths: Sequence[str | os.PathLike], hint: str = "") -> None:
    """Every path is a readable, whole image file (:func:`~difffeat.images.verify_image_file`): what a run
    checks before its model loads and before it writes anything, so a bad input costs seconds, not a model load,
    and leaves no output folder behind.

    Raises:
        InvalidImageError: the first bad file, by name, followed by ``hint``.
    """
    for path in paths:
        try:
            verify_image_file(path)
        except InvalidImageError as exc:
            raise InvalidImageError(f"{str(exc).rstrip('.')}. {hint}" if hint else str(exc)) from None


def probe_target_size(path: str, resolution: int, multiple: int, square: bool) -> tuple[int, int]:
    """(width, height) the image will have after preprocessing, from its header only (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # unreadable: its own batch; decoding it raises the clear InvalidImageError
        return (0, 0)
    if min(w, h) < 1:
        return (0, 0)
    return target_size(loaded_size((w, h)), resolution, multiple, square)  # as to_rgb downscales huge inputs


@dataclass(frozen=True)
class LoadFailure:
    """An input that could not be read, handed from a DataLoader worker to the main process as data.

    Raised inside a worker, the error would reach the user wrapped in the worker's traceback; returned, the
    main process raises it cleanly (or skips the item when asked to)."""

    message: str

    def error(self, hint: str = "") -> InvalidImageError:
        """The error to raise in the main process, with an optional sentence on what to do."""
        return InvalidImageError(f"{self.message.rstrip('.')}. {hint}" if hint else self.message)


class ResizedImages(Dataset):
    """``refs[i]`` -> ``(i, uint8 array [H, W, 3])`` resized like :meth:`Backbone.preprocess`, or
    ``(i, LoadFailure)`` for a file that cannot be used as an image."""

    def __init__(self, refs: Sequence[ImageRef], resolution: int, multiple: int, square: bool = False) -> None:
        self.refs, self.resolution, self.multiple, self.square = list(refs), resolution, multiple, square

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | LoadFailure]:
        try:
            img = resize_to_multiple(to_rgb(self.refs[i].path), self.resolution, self.multiple, self.square)
        except DifffeatError as exc:
            return i, LoadFailure(str(exc))
        return i, np.asarray(img, dtype=np.uint8)

    def target_size(self, i: int) -> tuple[int, int]:
        if self.square:
            return target_size((1, 1), self.resolution, self.multiple, True)
        return probe_target_size(self.refs[i].path, self.resolution, self.multiple, self.square)


class DecodedImages(Dataset):
    """``refs[i]`` -> ``(i, RGB PIL image)`` decoded like :func:`difffeat.images.to_rgb` (no resizing), or
    ``(i, LoadFailure)`` for a file that cannot be used as an image."""

    def __init__(self, refs: Sequence[ImageRef]) -> None:
        self.refs = list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, Image.Image | LoadFailure]:
        try:
            return i, to_rgb(self.refs[i].path)
        except DifffeatError as exc:
            return i, LoadFailure(str(exc))


def decoded_loader(refs: Sequence[ImageRef], num_workers: int) -> DataLoader:
    """Decoded images one at a time, in order, prepared ahead by ``num_workers`` workers."""
    return DataLoader(DecodedImages(refs), batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_first,
                      prefetch_factor=4 if num_workers else None)


class SizeBucketSampler(Sampler[list[int]]):
    """Batches of dataset positions whose images resize to the same size.

    Positions are visited in order; a batch is emitted as soon as its size bucket is full, and the partial
    buckets at the end in order of their first position. Deterministic for a given input.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sizes, self.batch_size = list(sizes), int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[tuple[int, int], list[int]] = {}
        for pos, size in enumerate(self.sizes):
            bucket = buckets.setdefault(size, [])
            bucket.append(pos)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()
        yield from sorted((b for b in buckets.values() if b), key=lambda b: b[0])

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = {}
        for s in self.sizes:
            counts[s] = counts.get(s, 0) + 1
        return sum(math.ceil(c / self.batch_size) for c in counts.values())


def _as_list(batch):
    return list(batch)


def image_loader(data: ResizedImages, batch_size: int, num_workers: int) -> DataLoader:
    """A loader of lists of ``(position, array)``; one size per batch unless ``batch_size`` is 1."""
    if batch_size == 1 or data.square:
        batches = [list(range(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)]
    else:
        batches = list(SizeBucketSampler([data.target_size(i) for i in range(len(data))], batch_size))
    return DataLoader(data, batch_sampler=batches, num_workers=num_workers, collate_fn=_as_list,
                      prefetch_factor=4 if num_workers else None, persistent_workers=False)


class EvalItems(Dataset):
    """Chosen positions of an evaluation dataset -> ``(dataset index, EvalItem)`` (decoded in workers)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int):
        i = self.indices[pos]
        try:
            return i, self.dataset[i]
        except DifffeatError as exc:  # raised again in the main process, without the worker's traceback
            return i, LoadFailure(str(exc))


def _first(batch):
    return batch[0]


def eval_loader(dataset, indices: Sequence[int], num_workers: int) -> DataLoader:
    """Items one at a time, in the order of ``indices``, prepared ahead by ``num_workers`` workers."""
    return DataLoader(EvalItems(dataset, indices), batch_size=1, shuffle=False, num_workers=num_workers,
                      collate_fn=_first, prefetch_factor=4 if num_workers else None)


def to_pil(array: np.ndarray | torch.Tensor) -> Image.Image:
    return Image.fromarray(np.asarray(array, dtype=np.uint8))
