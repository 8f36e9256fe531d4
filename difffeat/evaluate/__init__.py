"""Dataset evaluation: confusion-matrix mIoU on COCO, VOC-style and shapes datasets; linear pixel probes."""

from .datasets import VOID, CocoDataset, EvalItem, ShapesDataset, VocDataset, labelled_items, with_void
from .label_sources import AllClasses, CaptionFile, ImagePrompt, LabelFile, LabelSource, OracleLabels, label_source
from .metrics import ConfusionMatrix
from .probe import PixelProbe, ProbeScore, probe_score
from .runner import SETTINGS, EvalReport, TauSweep, evaluate, tune_tau

__all__ = ["CocoDataset", "VocDataset", "ShapesDataset", "EvalItem", "labelled_items", "ConfusionMatrix", "EvalReport", "evaluate", "tune_tau", "TauSweep", "SETTINGS", "PixelProbe", "ProbeScore", "probe_score",
           "VOID", "with_void", "LabelSource", "OracleLabels", "AllClasses", "LabelFile", "CaptionFile", "ImagePrompt", "label_source"]
