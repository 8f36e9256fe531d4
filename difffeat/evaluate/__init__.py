"""Dataset evaluation: confusion-matrix mIoU on COCO, VOC-style and shapes datasets; linear pixel probes.

The loop over a dataset (and tau tuning) is :mod:`difffeat.runs` (``evaluate``, ``run_eval``, ``tune_tau``)."""

from .datasets import VOID, CocoDataset, EvalItem, ShapesDataset, VocDataset, labelled_items, with_void
from .label_sources import AllClasses, CaptionFile, ImagePrompt, LabelFile, LabelSource, OracleLabels, label_source
from .metrics import ConfusionMatrix
from .probe import PixelProbe, ProbeScore, probe_score
from .pixel_ensemble import PixelEnsemble, PixelMLP, ScarceProtocol  # label-scarce segmentation protocol
from .scarce_data import LabelledSet, ddpm_segmentation, image_label_folders
from .spair import KeypointPair, pair_list, spair_pairs
from .correspondence import PckTally, nn_correspondences, pck_hits
from .runner import SETTINGS, TAU_GRID, WIDE_TAU_GRID, observe_items, EvalReport, TauSweep, best_tau, build_report, segment_item

__all__ = ["CocoDataset", "VocDataset", "ShapesDataset", "EvalItem", "labelled_items", "ConfusionMatrix", "EvalReport", "build_report", "segment_item", "best_tau", "TauSweep", "SETTINGS", "TAU_GRID", "WIDE_TAU_GRID", "observe_items", "PixelProbe", "ProbeScore", "probe_score",
           "VOID", "with_void", "LabelSource", "OracleLabels", "AllClasses", "LabelFile", "CaptionFile", "ImagePrompt", "label_source",
           "PixelEnsemble", "PixelMLP", "ScarceProtocol", "LabelledSet", "ddpm_segmentation", "image_label_folders",
           "KeypointPair", "pair_list", "spair_pairs", "PckTally", "nn_correspondences", "pck_hits"]
