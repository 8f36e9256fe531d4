"""Dataset-scale extraction and evaluation on many processes/GPUs with Hugging Face accelerate.

Run the ``difffeat extract`` / ``difffeat eval`` commands under ``accelerate launch``; every process takes a
disjoint shard, outputs are written atomically, a restart resumes, and ``manifest.json`` guards against
mixing outputs of different settings.

    accelerate launch --multi_gpu --num_processes 4 -m difffeat.cli extract MODEL imgs/ --preset P --out feats/
"""

from .data import ImageRef, coco_images, collect_images, voc_images
from . import evaluate
from .evaluate import EvalJob, run_eval, tune_tau_distributed
from .extract import ExtractJob, ExtractSummary, feature_file_ok, run_extract
from .manifest import Manifest, ManifestMismatchError
from .state import init_state, shard

__all__ = [
    "ImageRef", "collect_images", "coco_images", "voc_images", "ExtractJob", "ExtractSummary", "run_extract",
    "feature_file_ok", "EvalJob", "run_eval", "tune_tau_distributed", "Manifest", "ManifestMismatchError",
    "init_state", "shard",
]
