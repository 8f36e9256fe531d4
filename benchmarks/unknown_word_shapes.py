"""What an unknown class word does to the known classes: segment bundled example 0001 with its classes, then
with "banana" added (segmented anyway, as ``Segmenter`` does), then as the demo does (left out by
``check_class_words(..., drop_unknown=True)``), and score each known class's IoU against the example's mask.

    python benchmarks/unknown_word_shapes.py [--out benchmarks/results/unknown_word_shapes.json]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from PIL import Image

import difffeat
from difffeat.evaluate import ConfusionMatrix
from difffeat.io import write_json
from difffeat.segment.vocabulary import ClassVocabularyWarning, check_class_words
from difffeat.shapes.examples import read_examples
from difffeat.shapes.world import SHAPE_CLASSES

KNOWN = ["square", "ring", "diamond"]
UNKNOWN = "banana"


def known_iou(seg: difffeat.Segmenter, entry: dict, classes: list[str]) -> dict[str, float]:
    """IoU of each class of :data:`KNOWN` when ``entry``'s image is segmented into ``classes``."""
    gt = np.asarray(Image.open(entry["mask_path"]))  # shape-world class ids, 0 = background
    labels = seg(Image.open(entry["path"]), classes).labels  # 0 = background, i = classes[i-1]
    ids = [SHAPE_CLASSES.index(c) + 1 if c in SHAPE_CLASSES else 0 for c in classes]  # an unknown word: scored as background
    cm = ConfusionMatrix(len(SHAPE_CLASSES) + 1)
    cm.update(gt, np.array([0, *ids])[labels])
    iou = cm.iou()
    return {c: round(float(iou[SHAPE_CLASSES.index(c) + 1]), 3) for c in KNOWN}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/unknown_word_shapes.json")
    args = p.parse_args(argv)
    seg = difffeat.Segmenter("shapes")
    entry = next(e for e in read_examples() if e["file"] == "shapes_test_0001.png")
    with_word = [*KNOWN, UNKNOWN]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClassVocabularyWarning)
        rows = {
            "known classes only": known_iou(seg, entry, KNOWN),
            "unknown word segmented anyway": known_iou(seg, entry, with_word),
            "unknown word left out (demo)": known_iou(seg, entry, check_class_words(with_word, seg.backbone, drop_unknown=True).names),
        }
    write_json(args.out, {"example": entry["file"], "classes": with_word, "iou": rows})
    for name, iou in rows.items():
        print(f"{name}: " + ", ".join(f"{c} {v:.3f}" for c, v in iou.items()))


if __name__ == "__main__":
    main()
