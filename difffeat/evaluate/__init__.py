"""Dataset evaluation: confusion-matrix mIoU on COCO, VOC-style and shapes datasets; linear pixel probes.

The loop over a dataset (and tau tuning) is :mod:`difffeat.runs` (``evaluate``, ``run_eval``, ``tune_tau``)."""

from .datasets import CocoDataset, EvalItem, ShapesDataset, VocDataset, labelled_items
from .metrics import ConfusionMatrix
from .probe import PixelProbe, ProbeScore, probe_score
from .runner import SETTINGS, TAU_GRID, EvalReport, TauSweep, best_tau, build_report, segment_item

__all__ = ["CocoDataset", "VocDataset", "ShapesDataset", "EvalItem", "labelled_items", "ConfusionMatrix", "EvalReport", "build_report", "segment_item", "best_tau", "TauSweep", "SETTINGS", "TAU_GRID", "PixelProbe", "ProbeScore", "probe_score"]
