"""The run engine and its users: dataset-scale extraction, segmentation and evaluation on one or many
processes (Hugging Face accelerate).

Run the ``difffeat extract`` / ``segment`` / ``eval`` commands under ``accelerate launch``; every process takes a
disjoint shard, outputs are written atomically, a restart resumes, and ``manifest.json`` guards against
mixing outputs of different settings. One process is a world of one: the Python API's :func:`evaluate` and
:func:`tune_tau` are the same loop.

    accelerate launch --multi_gpu --num_processes 4 -m difffeat.cli extract MODEL imgs/ --preset P --out feats/
"""

import importlib
from typing import Any

#: public name -> module of this package that defines it (imported on first use: ``difffeat.runs.commands``,
#: which the CLI calls, checks its inputs before torch or diffusers are imported)
_API = {
    "Run": "engine", "RunSummary": "engine", "UNREADABLE": "engine",
    "EvalJob": "evaluation", "evaluate": "evaluation", "run_eval": "evaluation", "tune_tau": "evaluation",
    "ExtractJob": "extract", "ExtractSummary": "extract", "feature_file_ok": "extract", "run_extract": "extract",
    "Manifest": "manifest", "init_state": "processes", "shard": "processes",
    "SegmentJob": "segment", "run_segment": "segment",
    "GenerateJob": "generate", "run_generate": "generate", "generate_image": "generate", "GeneratedImage": "generate",
    "prompt_class_words": "generate",
    "ImageRef": "sources", "coco_images": "sources", "collect_images": "sources", "voc_images": "sources",
    # downstream tasks (label-scarce segmentation, correspondence, activation ranking)
    "ProbeJob": "scarce", "ProbeReport": "scarce", "run_probe": "scarce", "predict_label_maps": "scarce",
    "CorrespondJob": "correspond", "CorrespondReport": "correspond", "run_correspond": "correspond",
    "averaged_features": "correspond", "RankRow": "rank", "rank_activations": "rank", "save_rank_preset": "rank",
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'difffeat.runs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = list(_API)
