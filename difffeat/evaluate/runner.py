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
from .label_sources import ImagePrompt, label_source
from .metrics import ConfusionMatrix

__all__ = [
    "segment_items",
    "segment_prompts",
    "to_dataset_labels",
    "add_at_every_tau",
    "tau_grid_report",
    "PUBLISHED_TAU_GRID",
    "class_keys",
]

#: the background offsets tried when tau is tuned (the reference code's sweep)
TAU_GRID = tuple(float(t) for t in np.round(np.linspace(-0.4, 0.4, 17), 3))
#: the ablation benchmarks' grid: extended upwards so that no row's choice sits on the edge of the grid
WIDE_TAU_GRID = tuple(float(t) for t in np.round(np.linspace(-0.4, 1.0, 29), 3))

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
    setting_description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "miou": None if np.isnan(self.miou) else self.miou,  # no NaN token in the JSON (nothing to score)
            "pixel_accuracy": None if np.isnan(self.pixel_accuracy) else self.pixel_accuracy,
            "setting": self.setting,
            "setting_description": self.setting_description or label_source(self.setting).description,
            "n_images": self.n_images,
            "per_class_iou": self.per_class_iou,
            "seconds": round(self.seconds, 2),
            "segment_settings": self.settings,
            "difffeat_version": __version__,
            "python": platform.python_version(),
            **self.extra,
        }


def segment_prompt(segmenter: Segmenter, image: Any, classes: Sequence[str], prompt: ImagePrompt) -> SegmentationResult | None:
    """Segment one image with its :class:`ImagePrompt` (None when it names no class)."""
    if not prompt.labels:
        return None
    names = [classes[l - 1] for l in prompt.labels]
    return segmenter(image, names, entities=prompt.entities, caption=prompt.caption, class_phrases=prompt.class_phrases)


def segment_item(segmenter: Segmenter, item: EvalItem, classes: Sequence[str], setting: str) -> tuple[SegmentationResult | None, list[int]]:
    """Segment one dataset item with the prompt of the label source ``setting`` (``oracle``, ``all``,
    ``labels=FILE``, ``captions=FILE``; see :mod:`difffeat.evaluate.label_sources`); returns the result (None
    when the prompt would name no class) and the dataset label of each prompted class."""
    prompt = label_source(setting).prompt(item, classes)
    return segment_prompt(segmenter, item.image, classes, prompt), prompt.labels


def segment_prompts(
    segmenter: Segmenter, images: Sequence[Any], classes: Sequence[str], prompts: Sequence[ImagePrompt], batch_size: int = 1
) -> list[SegmentationResult | None]:
    """:func:`segment_prompt` for several images, ``batch_size`` images per forward (:meth:`Segmenter.segment`:
    images of one size share a forward, each with its own classes, caption and token layout); equals
    :func:`segment_prompt` image by image (to float tolerance)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
    named = [i for i, p in enumerate(prompts) if p.labels]  # an image whose prompt names no class: None
    results = segmenter.segment(
        [images[i] for i in named], [[classes[l - 1] for l in prompts[i].labels] for i in named], batch_size=batch_size,
        entities=[prompts[i].entities for i in named], captions=[prompts[i].caption for i in named],
        class_phrases=[prompts[i].class_phrases for i in named],
    )
    by_index = dict(zip(named, results))
    return [by_index.get(i) for i in range(len(images))]


def segment_items(
    segmenter: Segmenter, items: Sequence[EvalItem], classes: Sequence[str], setting: str, batch_size: int = 1
) -> list[tuple[SegmentationResult | None, list[int]]]:
    """:func:`segment_item` for several items, ``batch_size`` images per forward (:func:`segment_prompts`)."""
    source = label_source(setting)
    prompts = [source.prompt(item, classes) for item in items]
    results = segment_prompts(segmenter, [item.image for item in items], classes, prompts, batch_size)
    return [(result, prompt.labels) for result, prompt in zip(results, prompts)]


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


def class_keys(classes: Sequence[str]) -> list[str]:
    """Per-class report keys: "background" then the class names; a name that repeats (COCO-Stuff-27's two
    "food" and two "furniture" slots) gets its label appended, "food (15)", so no class overwrites another."""
    names = ["background"] + list(classes)
    seen: set[str] = set()
    keys = []
    for label, name in enumerate(names):
        keys.append(name if name not in seen else f"{name} ({label})")
        seen.add(name)
    return keys


def build_report(cm: ConfusionMatrix, classes: Sequence[str], setting: str, n: int, seconds: float, settings: dict,
                 average: str = "present") -> EvalReport:
    """The report of a summed confusion matrix (background = class 0, then ``classes``); ``average``: how
    the mIoU averages the classes (:data:`~difffeat.evaluate.metrics.MIOU_AVERAGES`)."""
    iou = cm.iou()
    report = EvalReport(
        miou=cm.miou(average),
        per_class_iou={name: (None if np.isnan(v) else float(v)) for name, v in zip(class_keys(classes), iou)},
        pixel_accuracy=cm.pixel_accuracy(),
        setting=setting,
        n_images=n,
        seconds=seconds,
        settings=settings,
        setting_description=label_source(setting).description,
    )
    report.extra["miou_average"] = average
    return report


#: the tau grid the published GOCA code prints mIoU for
PUBLISHED_TAU_GRID = (-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4)


def tau_grid_report(cms: dict[float, ConfusionMatrix], average: str = "present") -> dict[str, Any]:
    """mIoU at each tau on the evaluated split itself, labelled: the published code prints these and its
    papers' numbers are the best of them; the honest figure is the one at a tau chosen on another split."""
    by_tau = {f"{t:+.2f}": cm.miou(average) for t, cm in cms.items()}
    best = max(cms, key=lambda t: cms[t].miou(average))
    return {
        "note": "mIoU at each tau ON THE EVALUATED SPLIT (as the published GOCA code prints it); its best is "
        "optimistic, since tau is then chosen on the test data. The report's 'miou' uses one tau, fixed or "
        "chosen on a separate split.",
        "miou_by_tau": by_tau,
        "best_tau_on_evaluated_split": best,
        "best_miou_on_evaluated_split": cms[best].miou(average),
    }


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


def observe_items(backbone, dataset, t: int, heads: Sequence[str] = ("mean", "goca"), **overrides: Any) -> list:
    """Per dataset item ``(item, dataset labels present, {heads setting: Observation} or None)``: one observed
    forward per heads setting with everything any decision needs (``everything=True``), so one pass serves
    every layer/rescale/tau ablation; None when the item holds no class (oracle prompt would be empty)."""
    segs = {h: Segmenter(backbone, method="vanilla", heads=h, t=t, **overrides) for h in heads}
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        labels = item.present()
        names = [dataset.classes[label - 1] for label in labels]
        if not labels:
            out.append((item, labels, None))
            continue
        with backbone.reusing_latents():  # one VAE encode for every head setting
            out.append((item, labels, {h: s.observe(item.image, names, everything=True) for h, s in segs.items()}))
    return out
