"""Dataset evaluation: confusion-matrix mIoU on COCO, VOC-style and shapes datasets; linear pixel probes.

The loop over a dataset (and tau tuning) is :mod:`difffeat.runs` (``evaluate``, ``run_eval``, ``tune_tau``)."""

from .datasets import VOID, CocoDataset, EvalItem, ShapesDataset, VocDataset, labelled_items, with_void
from .label_sources import AllClasses, CaptionFile, ImagePrompt, LabelFile, LabelSource, OracleLabels, label_source
from .metrics import ConfusionMatrix
from .probe import PixelProbe, ProbeScore, probe_score
from .runner import SETTINGS, TAU_GRID, WIDE_TAU_GRID, observe_items, EvalReport, TauSweep, best_tau, build_report, segment_item

__all__ = ["CocoDataset", "VocDataset", "ShapesDataset", "EvalItem", "labelled_items", "ConfusionMatrix", "EvalReport", "build_report", "segment_item", "best_tau", "TauSweep", "SETTINGS", "TAU_GRID", "WIDE_TAU_GRID", "observe_items", "PixelProbe", "ProbeScore", "probe_score",
           "VOID", "with_void", "LabelSource", "OracleLabels", "AllClasses", "LabelFile", "CaptionFile", "ImagePrompt", "label_source"]
