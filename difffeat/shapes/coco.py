"""Export shapes-world samples as a COCO-instances folder, and load them back.

Layout written by :func:`export_split`::

    DIR/images/<split>_<index>.png
    DIR/annotations.json   # COCO instances: images, categories 1..8, RLE segmentations
    DIR/captions.json      # [{"image_id", "file_name", "caption", "classes_present"}]

Run as ``python -m difffeat.shapes.coco --split test --n 300 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from difffeat.shapes.world import SHAPE_CLASSES, sample

__all__ = ["export_split", "load_coco_folder", "categories"]


def categories() -> list[dict]:
    """COCO categories: ids 1..8 in :data:`SHAPE_CLASSES` order."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_save_png(path: Path, image: Image.Image) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def export_split(split: str, n: int, out: str | Path, start: int = 0) -> Path:
    """Write samples ``start .. start+n-1`` of ``split`` as a COCO folder; returns the annotation path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, captions = [], [], []
    ann_id = 1
    for image_id, index in enumerate(range(start, start + n), start=1):
        s = sample(split, index)
        file_name = f"{split}_{index:06d}.png"
        _atomic_save_png(out / "images" / file_name, s.image)
        h, w = s.mask.shape
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        captions.append(
            {"image_id": image_id, "file_name": file_name, "caption": s.caption, "classes_present": list(s.classes_present)}
        )
        for inst in s.instances:
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            area = float(mask_utils.area(rle))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {"id": ann_id, "image_id": image_id, "category_id": inst.class_index, "segmentation": rle,
                 "area": area, "bbox": bbox, "iscrowd": 0, "attributes": {"colour": inst.colour}}  # fmt: skip
            )
            ann_id += 1
    coco = {
        "info": {"description": f"difffeat shapes world, split {split!r}, indices {start}..{start + n - 1}"},
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    ann_path = out / "annotations.json"
    _atomic_write_bytes(ann_path, json.dumps(coco).encode())
    _atomic_write_bytes(out / "captions.json", json.dumps(captions, indent=1).encode())
    return ann_path


def load_coco_folder(folder: str | Path) -> list[tuple[Image.Image, np.ndarray, str]]:
    """Load ``(image RGB, semantic mask uint8 [H, W], file name)`` for every image of a COCO folder.

    The semantic mask holds category ids (0 = background); annotations are painted in id order, so later
    instances overwrite earlier ones where they overlap (as in the generator).
    """
    folder = Path(folder)
    coco = COCO(str(folder / "annotations.json"))
    items = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        sem = np.zeros((info["height"], info["width"]), np.uint8)
        for ann in sorted(coco.loadAnns(coco.getAnnIds(imgIds=img_id)), key=lambda a: a["id"]):
            sem[coco.annToMask(ann) > 0] = ann["category_id"]
        image = Image.open(folder / "images" / info["file_name"]).convert("RGB")
        items.append((image, sem, info["file_name"]))
    return items


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export shapes-world samples in COCO instances format.")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    path = export_split(args.split, args.n, args.out, start=args.start)
    print(f"wrote {args.n} {args.split} samples to {path.parent}")


if __name__ == "__main__":
    main()
