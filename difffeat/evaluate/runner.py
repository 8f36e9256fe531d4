"""Scoring a Segmenter on dataset items: mIoU and per-class IoU in a stated setting (the per-item steps and the
report; the dataset loop, sharded and resumable, is :func:`difffeat.runs.run_eval`).

Settings:
* ``oracle`` — "oracle image labels": each prompt names only the classes present in that image's ground
  truth (what the GOCA paper and its reference code do; comparable to their numbers).
* ``all`` — "all dataset classes": every prompt names every class (open-vocabulary, harder).

The background offset tau is chosen on a *separate* split (:func:`difffeat.runs.tune_tau`), never on the test split.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..version import __version__
from ..segment.segmenter import SegmentationResult, Segmenter
from .datasets import EvalItem
from .metrics import ConfusionMatrix

__all__ = ["EvalReport", "best_tau", "TauSweep", "SETTINGS", "TAU_GRID", "segment_item", "to_dataset_labels", "add_at_every_tau", "build_report"]

#: the background offsets tried when tau is tuned
TAU_GRID = tuple(float(t) for t in np.round(np.linspace(-0.4, 0.4, 17), 3))

SETTINGS = {
    "oracle": "oracle image labels (prompt names the classes present in the ground truth; as in the papers)",
    "all": "all dataset classes (open-vocabulary: every prompt names every class)",
}


@dataclass
class EvalReport:
    miou: float
    per_class_iou: dict[str, float | None]
    pixel_accuracy: float
    setting: str
    n_images: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "setting": self.setting,
            "setting_description": SETTINGS[self.setting],
            "n_images": self.n_images,
            "per_class_iou": self.per_class_iou,
            "seconds": round(self.seconds, 2),
            "segment_settings": self.settings,
            "difffeat_version": __version__,
            "python": platform.python_version(),
            **self.extra,
        }


def _prompt_classes(item: EvalItem, classes: Sequence[str], setting: str) -> list[int]:
    if setting == "oracle":
        return item.present()
    if setting == "all":
        return list(range(1, len(classes) + 1))
    raise ValueError(f"unknown setting {setting!r}; use one of {sorted(SETTINGS)}")


def segment_item(segmenter: Segmenter, item: EvalItem, classes: Sequence[str], setting: str) -> tuple[SegmentationResult | None, list[int]]:
    """Segment one dataset item; returns the result (None when the oracle prompt would be empty) and the
    dataset label of each prompted class."""
    labels = _prompt_classes(item, classes, setting)
    if not labels:
        return None, labels
    return segmenter(item.image, [classes[l - 1] for l in labels]), labels


def to_dataset_labels(result: SegmentationResult | None, labels: list[int], shape: tuple[int, int]) -> np.ndarray:
    """The result as dataset labels on the ground truth's grid ``shape``.

    Results come at the segmented image's size, which is smaller than the annotation when the image was
    downscaled on input (above ``difffeat.images.MAX_PIXELS``); they are then resized (nearest neighbour)."""
    if result is None:
        return np.zeros(shape, np.uint8)
    lut = np.array([0] + labels, dtype=np.uint8)
    pred = lut[result.labels]
    if pred.shape != tuple(shape):
        pred = np.asarray(Image.fromarray(pred).resize((shape[1], shape[0]), Image.NEAREST))
    return pred


def build_report(cm: ConfusionMatrix, classes: Sequence[str], setting: str, n: int, seconds: float, settings: dict) -> EvalReport:
    """The report of a summed confusion matrix (background = class 0, then ``classes``)."""
    iou = cm.iou()
    names = ["background"] + list(classes)
    return EvalReport(
        miou=cm.miou(),
        per_class_iou={name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
        pixel_accuracy=cm.pixel_accuracy(),
        setting=setting,
        n_images=n,
        seconds=seconds,
        settings=settings,
    )


def best_tau(scores: dict[float, float]) -> float:
    """The tau with the best score; ties go to the tau nearest 0."""
    return max(scores, key=lambda t: (scores[t], -abs(t)))


def add_at_every_tau(cms: dict[float, ConfusionMatrix], result: SegmentationResult | None, labels: list[int], gt: np.ndarray) -> None:
    """Add one image's result, decided at each tau of ``cms`` (no new forward), to that tau's matrix."""
    for tau, cm in cms.items():
        cm.update(gt, to_dataset_labels(result.with_tau(tau) if result is not None else None, labels, gt.shape))


class TauSweep:
    """Confusion matrices of several decision rows at every tau, on a tuning split and a test split.

    Each row's tau is chosen by its mIoU on the tuning split (ties: the tau nearest 0) and the row is scored on
    the test split at that tau, so the test split never picks tau. Rows are any hashable keys (for example
    ``(head setting, decision)``); one segmentation result serves every tau (:meth:`SegmentationResult.with_tau`).
    """

    def __init__(self, n_classes: int, taus: Sequence[float], tune: str = "val", test: str = "test") -> None:
        self.n_classes, self.taus, self.tune, self.test = n_classes, tuple(float(t) for t in taus), tune, test
        self._cms: dict[str, dict[Any, dict[float, ConfusionMatrix]]] = {tune: {}, test: {}}

    def update(self, split: str, row: Any, result: SegmentationResult | None, labels: list[int], gt: np.ndarray) -> None:
        """Add one image's result (its class ``labels`` are dataset labels) to ``row`` on ``split``, at every tau."""
        if split not in self._cms:
            raise ValueError(f"unknown split {split!r}; this sweep has {self.tune!r} (tuning) and {self.test!r} (test)")
        cms = self._cms[split].setdefault(row, {tau: ConfusionMatrix(self.n_classes) for tau in self.taus})
        add_at_every_tau(cms, result, labels, gt)

    def rows(self) -> list[dict[str, Any]]:
        """Per row (in first-seen test order): ``row``, test ``miou`` at the tuned ``tau``, ``foreground_iou``,
        ``class_accuracy_on_found`` and the row's ``tune_miou``."""
        out = []
        for row, test_cms in self._cms[self.test].items():
            if row not in self._cms[self.tune]:
                raise ValueError(f"row {row!r} has no {self.tune!r} results to choose tau from")
            by_tau = {tau: cm.miou() for tau, cm in self._cms[self.tune][row].items()}
            tau = best_tau(by_tau)
            cm = test_cms[tau]
            out.append({"row": row, "miou": cm.miou(), "tau": tau, "foreground_iou": cm.foreground_iou(),
                        "class_accuracy_on_found": cm.class_accuracy_on_found(), "tune_miou": by_tau[tau]})  # fmt: skip
        return out
