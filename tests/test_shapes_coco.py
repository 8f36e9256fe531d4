"""COCO export of the shapes world round-trips through pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from difffeat.shapes.coco import export_split, load_coco_folder, main
from difffeat.shapes.world import SHAPE_CLASSES, sample


def test_export_round_trip(tmp_path: Path) -> None:
    ann_path = export_split("test", 12, tmp_path, start=3)
    coco = json.loads(ann_path.read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 9))
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    assert len(coco["images"]) == 12
    assert not list(tmp_path.rglob("*.tmp"))
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        assert ann["iscrowd"] == 0 and ann["area"] > 0 and len(ann["bbox"]) == 4
        by_image.setdefault(ann["image_id"], []).append(ann)
    for img in coco["images"]:
        index = int(img["file_name"].split("_")[1].split(".")[0])
        s = sample("test", index)
        anns = sorted(by_image[img["id"]], key=lambda a: a["id"])
        assert len(anns) == len(s.instances)
        for ann, inst in zip(anns, s.instances):
            decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(decoded, inst.mask)
            assert ann["category_id"] == inst.class_index and ann["area"] == inst.area
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / img["file_name"])), np.asarray(s.image))
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert captions[0]["caption"] == sample("test", 3).caption


def test_loader_returns_semantic_masks(tmp_path: Path) -> None:
    main(["--split", "val", "--n", "5", "--out", str(tmp_path)])
    items = load_coco_folder(tmp_path)
    assert len(items) == 5
    for k, (image, sem, name) in enumerate(items):
        s = sample("val", k)
        assert name == f"val_{k:06d}.png" and image.size == (64, 64)
        assert np.array_equal(sem, s.mask)
