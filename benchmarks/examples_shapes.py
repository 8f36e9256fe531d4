"""Segment each bundled example (difffeat/examples) with its own classes and score it against its mask.

    python benchmarks/examples_shapes.py [--model shapes] [--out benchmarks/results/examples_shapes.json]

Per example: pixel accuracy over all pixels (background included) and the IoU of each class present; this is
where the README's remark about the quick-start image and the other examples comes from.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

import difffeat
from difffeat.evaluate import ConfusionMatrix
from difffeat.io import write_json
from difffeat.shapes.examples import read_examples
from difffeat.shapes.world import SHAPE_CLASSES


def score_examples(model: str = "shapes") -> list[dict]:
    seg = difffeat.Segmenter(model)
    rows = []
    for entry in read_examples():
        gt = np.asarray(Image.open(entry["mask_path"]))  # shape-world class ids, 0 = background
        classes = entry["classes_present"]
        labels = seg(Image.open(entry["path"]), classes).labels  # 0 = background, i = classes[i-1]
        ids = [SHAPE_CLASSES.index(c) + 1 for c in classes]
        cm = ConfusionMatrix(len(SHAPE_CLASSES) + 1)
        cm.update(gt, np.array([0, *ids])[labels])
        iou = cm.iou()
        rows.append({"file": entry["file"], "classes": classes, "pixel_accuracy": round(cm.pixel_accuracy(), 3),
                     "iou": {c: round(float(iou[i]), 3) for c, i in zip(classes, ids)}})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--out", default="benchmarks/results/examples_shapes.json")
    args = p.parse_args(argv)
    rows = score_examples(args.model)
    write_json(args.out, {"model": args.model, "examples": rows})
    for r in rows:
        print(f"{r['file']}: pixel accuracy {r['pixel_accuracy']:.3f}; " + ", ".join(f"{c} {v:.2f}" for c, v in r["iou"].items()))


if __name__ == "__main__":
    main()
