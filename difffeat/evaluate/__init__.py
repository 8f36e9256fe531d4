"""Dataset evaluation: confusion-matrix mIoU on COCO, VOC-style and shapes datasets; linear pixel probes."""

from .datasets import CocoDataset, EvalItem, ShapesDataset, VocDataset
from .metrics import ConfusionMatrix
from .probe import PixelProbe, ProbeScore, probe_score
from .runner import SETTINGS, EvalReport, evaluate, tune_tau

__all__ = ["CocoDataset", "VocDataset", "ShapesDataset", "EvalItem", "ConfusionMatrix", "EvalReport", "evaluate", "tune_tau", "SETTINGS", "PixelProbe", "ProbeScore", "probe_score"]
