"""The run engine and its users: dataset-scale extraction, segmentation and evaluation on one or many
processes (Hugging Face accelerate).

Run the ``difffeat extract`` / ``segment`` / ``eval`` commands under ``accelerate launch``; every process takes a
disjoint shard, outputs are written atomically, a restart resumes, and ``manifest.json`` guards against
mixing outputs of different settings. One process is a world of one: the Python API's :func:`evaluate` and
:func:`tune_tau` are the same loop.

    accelerate launch --multi_gpu --num_processes 4 -m difffeat.cli extract MODEL imgs/ --preset P --out feats/
"""

from .engine import UNREADABLE, Run, RunSummary
from .evaluation import EvalJob, evaluate, run_eval, tune_tau
from .extract import ExtractJob, ExtractSummary, feature_file_ok, run_extract
from .manifest import Manifest
from .processes import init_state, shard
from .segment import SegmentJob, run_segment
from .sources import ImageRef, coco_images, collect_images, voc_images

__all__ = [
    "Run", "RunSummary", "UNREADABLE", "ImageRef", "collect_images", "coco_images", "voc_images", "ExtractJob",
    "ExtractSummary", "run_extract", "feature_file_ok", "SegmentJob", "run_segment", "EvalJob", "run_eval",
    "evaluate", "tune_tau", "Manifest", "init_state", "shard",
]
