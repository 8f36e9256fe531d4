"""Zero-shot semantic correspondence (DIFT's nearest neighbour) and its PCK score, as the activation paper's
reference evaluates SPair-71k (Darkbblue/generic-diffusion-feature ``correspondence/``, ``--algorithm nn``):

* both images' features are bilinearly upsampled to a ``load_size`` grid (512 x 512); keypoints, given as
  ``(x, y)`` in image pixels, are scaled to that grid and rounded;
* each source keypoint's feature vector is compared by cosine similarity with every target pixel; the most
  similar pixel is the prediction, scaled back to the target image's pixels;
* a prediction is correct at ``alpha`` when its distance to the true target keypoint is at most
  ``alpha * max(W, H)`` of the target image (PCK per image) or ``alpha * max(w, h)`` of the target's bounding
  box (PCK per box); scores pool every keypoint of the evaluated pairs (and of each category).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .pixels import pixel_features

__all__ = ["rescale_points"]


def rescale_points(points_yx: np.ndarray, old_wh: tuple[float, float], new_wh: tuple[float, float]) -> np.ndarray:
    """``(y, x)`` points of an image of size ``old_wh`` (width, height) moved to one of size ``new_wh``."""
    return np.asarray(points_yx, dtype=np.float64) * np.array([new_wh[1] / old_wh[1], new_wh[0] / old_wh[0]])


@torch.no_grad()
def nn_correspondences(src_maps: Sequence[torch.Tensor], tgt_maps: Sequence[torch.Tensor], src_points_yx: np.ndarray,
                       load_size: tuple[int, int] = (512, 512), chunk: int = 64) -> np.ndarray:
    """Nearest-neighbour matches ``[N, 2]`` (``(y, x)`` on the ``load_size = (W, H)`` grid) of ``src_points_yx``
    (on the same grid): argmax over target pixels of the cosine similarity of the upsampled features
    (``[C_i, h_i, w_i]`` maps, concatenated). The target maps are upsampled ``chunk`` channels at a time, so
    memory holds ``N x H x W`` similarities, not the ``C x H x W`` upsampled features."""
    w, h = load_size
    pts = np.asarray(src_points_yx, dtype=np.float64).reshape(-1, 2)
    y = np.round(np.clip(pts[:, 0], 0, h - 1))
    x = np.round(np.clip(pts[:, 1], 0, w - 1))
    idx = torch.from_numpy((y * w + x).astype(np.int64))
    src = pixel_features(src_maps, idx, (h, w))  # [N, C]
    src = src / torch.linalg.norm(src, dim=1, keepdim=True)
    dots = torch.zeros(len(idx), h * w)
    norm2 = torch.zeros(h * w)
    c0 = 0
    for m in tgt_maps:
        for s in range(0, m.shape[0], chunk):
            up = F.interpolate(m[s:s + chunk][None].float(), (h, w), mode="bilinear", align_corners=False)[0].reshape(-1, h * w)
            dots += src[:, c0:c0 + up.shape[0]] @ up
            norm2 += (up * up).sum(0)
            c0 += up.shape[0]
    best = (dots / norm2.sqrt()).argmax(1)
    return torch.stack([best // w, best % w], dim=-1).numpy().astype(np.float64)


def pck_hits(pred_yx: np.ndarray, true_yx: np.ndarray, alpha: float, image_wh: tuple[float, float],
             bbox: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per keypoint ``(distance, correct)``: correct when the distance is at most ``alpha * max(W, H)`` of the
    image, or, given ``bbox = (left, top, right, bottom)``, ``alpha * max(right - left, bottom - top)``."""
    dist = np.linalg.norm(np.asarray(pred_yx, np.float64) - np.asarray(true_yx, np.float64), axis=-1)
    if bbox is None:
        return dist, dist <= alpha * max(image_wh)
    left, top, right, bottom = bbox
    return dist, dist <= alpha * max(right - left, bottom - top)


@dataclass
class PckTally:
    """Keypoint counts pooled over pairs, overall and per category."""

    alpha: float
    correct_img: dict[str, int] = field(default_factory=dict)
    correct_bbox: dict[str, int] = field(default_factory=dict)
    keypoints: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)

    def add(self, category: str, hits_img: np.ndarray, hits_bbox: np.ndarray) -> None:
        for d, v in ((self.correct_img, int(hits_img.sum())), (self.correct_bbox, int(hits_bbox.sum())),
                     (self.keypoints, int(hits_img.size)), (self.pairs, 1)):
            d[category] = d.get(category, 0) + v

    def to_json(self) -> dict:
        def score(num: dict[str, int], cats) -> float:
            n = sum(self.keypoints[c] for c in cats)
            return sum(num[c] for c in cats) / n if n else float("nan")

        cats = sorted(self.keypoints)
        return {
            "alpha": self.alpha,
            "pck_img": score(self.correct_img, cats), "pck_bbox": score(self.correct_bbox, cats),
            "keypoints": sum(self.keypoints.values()), "pairs": sum(self.pairs.values()),
            "per_category": {c: {"pck_img": score(self.correct_img, [c]), "pck_bbox": score(self.correct_bbox, [c]),
                                 "keypoints": self.keypoints[c], "pairs": self.pairs[c]} for c in cats},
        }
