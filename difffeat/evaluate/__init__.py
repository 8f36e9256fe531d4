"""Dataset evaluation: confusion-matrix mIoU on COCO, VOC-style and shapes datasets; linear pixel probes."""

from .datasets import CocoDataset, EvalItem, ShapesDataset, VocDataset, labelled_items
from .metrics import ConfusionMatrix
from .probe import PixelProbe, ProbeScore, probe_score
from .runner import SETTINGS, EvalReport, TauSweep, evaluate, tune_tau

__all__ = ["CocoDataset", "VocDataset", "ShapesDataset", "EvalItem", "labelled_items", "ConfusionMatrix", "EvalReport", "evaluate", "tune_tau", "TauSweep", "SETTINGS", "PixelProbe", "ProbeScore", "probe_score"]
