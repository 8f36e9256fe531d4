"""Confusion-matrix segmentation metrics (accumulated over a dataset, reducible across processes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


IGNORE = 255
#: how per-class IoUs become one mIoU: "present" (difffeat: classes occurring in ground truth or prediction)
#: or "published" (the GOCA code: every class of the dataset, an absent class counting as IoU 0)
MIOU_AVERAGES = ("present", "published")


@dataclass
class ConfusionMatrix:
    """``counts[g, p]`` = pixels of ground-truth class g predicted as p; labels ``IGNORE`` are skipped.

    Class 0 is background; 1..n are the dataset's classes.
    """

    num_classes: int
    counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
        valid = gt != IGNORE
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        if g.size and (g.max() >= self.num_classes or p.max() >= self.num_classes):
            raise ValueError(f"label outside [0, {self.num_classes - 1}]")
        self.counts += np.bincount(g * self.num_classes + p, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return ConfusionMatrix(self.num_classes, self.counts + other.counts)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self, average: str = "present") -> float:
        """Mean IoU. ``average="present"``: over the classes that occur (in ground truth or prediction).
        ``average="published"`` (the GOCA code's metric): ``mean_c I_c / (U_c + 1e-8)`` over every class c of
        the matrix, background included, so a class absent from both counts as 0."""
        if average == "published":
            tp = np.diag(self.counts).astype(np.float64)
            union = self.counts.sum(0) + self.counts.sum(1) - tp
            return float(np.mean(tp / (1e-8 + union)))
        if average != "present":
            raise ValueError(f"unknown mIoU average {average!r}; use one of {MIOU_AVERAGES}")
        return float(np.nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float("nan")

    def foreground_iou(self) -> float:
        """IoU of "some object" vs background, whatever the class: how well objects are found at all."""
        c = self.counts
        fg_tp = c[1:, 1:].sum()
        union = c[1:, :].sum() + c[:, 1:].sum() - fg_tp
        return float(fg_tp / union) if union else float("nan")

    def class_accuracy_on_found(self) -> float:
        """Of the object pixels predicted as some object, the share given the right class: how well the
        found objects are told apart (the part of the error a better localisation cannot fix)."""
        c = self.counts
        found = c[1:, 1:].sum()
        return float(np.trace(c[1:, 1:]) / found) if found else float("nan")
