"""Semantic-correspondence runs: features of every image of the pairs (the run engine's extraction, one
cached folder per noise seed), then zero-shot nearest-neighbour matching and PCK (see
:mod:`difffeat.evaluate.correspondence`).

``ensemble_size`` > 1 averages each image's features over that many noise seeds (``seed``, ``seed + 1``, ...),
as DIFT's ``ensemble_size`` averages a batch of differently noised copies.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidOptionError
from ..evaluate.correspondence import PckTally, nn_correspondences, pck_hits, rescale_points
from ..evaluate.spair import KeypointPair
from ..features import FeatureExtractor
from ..io import load_features, write_json

__all__ = ["match_pair"]


@dataclass
class CorrespondJob:
    """Options of a correspondence run (see :func:`run_correspond`)."""

    out_dir: Path
    prompt: str = ""
    alpha: float = 0.1
    load_size: tuple[int, int] = (512, 512)  # (W, H) grid the features are upsampled to
    ensemble_size: int = 1
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 < float(self.alpha) <= 1:
            raise InvalidOptionError(f"--alpha must be in (0, 1], got {self.alpha!r}")
        if isinstance(self.ensemble_size, bool) or not isinstance(self.ensemble_size, int) or not 1 <= self.ensemble_size <= 64:
            raise InvalidOptionError(f"--ensemble-size must be an integer in 1..64, got {self.ensemble_size!r}")
        if len(self.load_size) != 2 or not all(isinstance(v, int) and 8 <= v <= 4096 for v in self.load_size):
            raise InvalidOptionError(f"--load-size must be two integers in 8..4096 (W, H), got {self.load_size!r}")


@dataclass
class CorrespondReport:
    """PCK at ``alpha`` per image and per box, overall and per category (``scores``), and the settings."""

    scores: dict[str, Any]
    features: dict[str, Any]
    ensemble_size: int
    load_size: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {**self.scores, "features": self.features, "ensemble_size": self.ensemble_size,
                "load_size": list(self.load_size)}


def image_stem(path: str) -> str:
    """A cache file name unique to the image path."""
    return f"{Path(path).stem}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]}"


def averaged_features(fx: FeatureExtractor, images: Sequence[Any], prompt: str = "", ensemble_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Per image ``{name: [C, h, w]}`` averaged over ``ensemble_size`` noise seeds (``fx.seed`` onwards)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in images]
    for k in range(ensemble_size):
        fk = copy.copy(fx)
        fk.seed = fx.seed + k
        for item in fk.iter_items(list(images), prompt):
            for n, v in item.features.items():
                out[item.index][n] = out[item.index].get(n, 0) + v.float() / ensemble_size
    return out


def match_pair(pair: KeypointPair, src: Sequence[torch.Tensor], tgt: Sequence[torch.Tensor], src_wh: tuple[int, int],
               tgt_wh: tuple[int, int], load_size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """Predicted target keypoints ``[N, 2]`` as ``(x, y)`` in target-image pixels for the pair's source keypoints."""
    src_yx = rescale_points(np.asarray(pair.source_xy)[:, ::-1], src_wh, load_size)
    pred_yx = rescale_points(nn_correspondences(src, tgt, src_yx, load_size), load_size, tgt_wh)
    return pred_yx[:, ::-1]


def run_correspond(fx: FeatureExtractor, pairs: Sequence[KeypointPair], job: CorrespondJob, state=None) -> CorrespondReport:
    """Match every pair and score PCK@alpha; writes ``OUT/features/seed<k>/``, ``OUT/predictions.json`` and
    ``OUT/report.json``."""
    from PIL import Image

    from .extract import ExtractJob, run_extract
    from .sources import ImageRef

    out = Path(job.out_dir)
    paths = sorted({p for pair in pairs for p in (pair.source, pair.target)})
    refs = [ImageRef(image_stem(p), p) for p in paths]
    folders = []
    for k in range(job.ensemble_size):
        fk = copy.copy(fx)
        fk.seed = fx.seed + k
        folder = out / "features" / f"seed{fk.seed}"
        run_extract(fk, refs, ExtractJob(folder, prompt=job.prompt, num_workers=job.num_workers, overwrite=job.overwrite,
                                         progress=job.progress, dataset={"pairs": len(pairs)}), state)
        folders.append(folder)

    def maps(path: str) -> list[torch.Tensor]:
        feats = [load_features(f / f"{image_stem(path)}.safetensors") for f in folders]
        return [sum(d[n].float() for d in feats) / len(feats) for n in fx.names]

    tally = PckTally(job.alpha)
    predictions = []
    from tqdm.auto import tqdm

    for pair in tqdm(pairs, desc="correspond", unit="pair", disable=not job.progress):
        with Image.open(pair.source) as a, Image.open(pair.target) as b:
            src_wh, tgt_wh = a.size, b.size
        pred_xy = match_pair(pair, maps(pair.source), maps(pair.target), src_wh, tgt_wh, job.load_size)
        true_yx = np.asarray(pair.target_xy)[:, ::-1]
        _, hit_img = pck_hits(pred_xy[:, ::-1], true_yx, job.alpha, tgt_wh)
        if pair.target_bbox is not None:
            _, hit_box = pck_hits(pred_xy[:, ::-1], true_yx, job.alpha, tgt_wh, pair.target_bbox)
        else:
            hit_box = np.zeros_like(hit_img)
        tally.add(pair.category, hit_img, hit_box)
        predictions.append({"pair": pair.name, "category": pair.category, "predicted_xy": pred_xy.tolist(),
                            "correct_img": hit_img.tolist(), "correct_bbox": hit_box.tolist()})
    report = CorrespondReport(tally.to_json(), fx.settings(), job.ensemble_size, tuple(job.load_size))
    write_json(out / "predictions.json", predictions)
    write_json(out / "report.json", report.to_json())
    return report
