"""Post-processing of a segmentation's decision at image resolution: PAMR and dense CRF.

Both are what the GOCA reference code (Darkbblue/goca, ``components/postprocess``) offers; its shipped
configs enable neither. difffeat applies them after the background decision, to the label map (PAMR) or to
the decision scores {background = tau + supporting map, classes} (CRF), bilinearly upsampled to the image:

* ``pamr`` — pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as the reference calls it: the
  one-hot label map is refined with the image's local affinities (10 iterations, dilations 1, 2, 4, 8), then
  argmax and a 3x3 median filter.
* ``crf`` — fully connected CRF (Krähenbühl & Koltun 2011) through the ``pydensecrf2`` package (the
  optional extra ``difffeat[crf]``) with the reference's parameters. The reference feeds the CRF its class
  and supporting maps before the tau decision and a BGR image that wrapped below zero when cast to uint8
  (mean subtraction before the cast); difffeat gives it the decision scores (so background competes in the
  CRF) and the plain RGB image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingExtraError
from .settings import Postprocess

__all__ = [
    "pamr_affinity",
    "pamr_refine",
    "pamr_labels",
    "dense_crf_labels",
    "postprocess_labels",
    "check_postprocess",
]

POSTPROCESS = get_args(Postprocess)  # ("none", "pamr", "crf")


@dataclass(frozen=True)
class PamrParams:
    """PAMR as the reference calls it: ``iterations`` mask updates over the 8-neighbourhoods at each of
    ``dilations``, then a ``median`` x ``median`` median filter of the argmax."""

    iterations: int = 10
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    median: int = 3


@dataclass(frozen=True)
class CrfParams:
    """Dense CRF parameters of the reference (``dcrf.py``): mean-field ``iterations``; Gaussian (smoothness)
    kernel ``pos_xy_std``/``pos_w``; bilateral (appearance) kernel ``bi_xy_std``/``bi_rgb_std``/``bi_w``."""

    iterations: int = 10
    pos_xy_std: float = 1.0
    pos_w: float = 3.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    bi_w: float = 4.0


def _neighbours(x: torch.Tensor, dilations: tuple[int, ...], centre: bool) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, P, H, W]``: each pixel's 3x3 neighbours at every dilation (replicate
    padding); P = 8 per dilation, 9 with ``centre``."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == dx == 0 and not centre:
                    continue
                out.append(padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, dim=2)


def pamr_affinity(image: torch.Tensor, dilations: tuple[int, ...] = (1, 2, 4, 8)) -> torch.Tensor:
    """PAMR's pixel-adaptive affinities ``[B, 1, P, H, W]`` of an image ``[B, 3, H, W]``.

    ``k(i, j) = -mean_c |I_c(i) - I_c(j)| / (1e-8 + 0.1 * sigma_c(i))`` for the P neighbours j of pixel i,
    with ``sigma_c(i)`` the (unbiased) standard deviation of channel c over i's neighbourhoods at every
    dilation, centre included; ``alpha(i, .) = softmax_j k(i, j)``."""
    image = image.float()
    sigma = _neighbours(image, dilations, centre=True).std(dim=2, keepdim=True)  # [B, 3, 1, H, W]
    diff = (_neighbours(image, dilations, centre=False) - image[:, :, None]).abs()  # [B, 3, P, H, W]
    k = -(diff / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True)
    return k.softmax(dim=2)


def pamr_refine(masks: torch.Tensor, image: torch.Tensor, params: PamrParams = PamrParams()) -> torch.Tensor:
    """Refine masks ``[B, K, H, W]`` with the image ``[B, 3, H, W]``: ``m(i) <- sum_j alpha(i, j) m(j)``,
    ``params.iterations`` times (the neighbours j exclude i itself)."""
    alpha = pamr_affinity(image, params.dilations)
    masks = masks.float()
    for _ in range(params.iterations):
        masks = (_neighbours(masks, params.dilations, centre=False) * alpha).sum(dim=2)
    return masks


def pamr_labels(labels: np.ndarray, image: np.ndarray, n_labels: int, params: PamrParams = PamrParams()) -> np.ndarray:
    """A label map ``uint8 [H, W]`` (values < ``n_labels``) refined by PAMR with the RGB image
    ``uint8 [H, W, 3]``: one-hot masks -> :func:`pamr_refine` -> argmax -> median filter."""
    from scipy.ndimage import median_filter

    lab = torch.from_numpy(labels.astype(np.int64))
    masks = F.one_hot(lab, n_labels).permute(2, 0, 1)[None].float()  # [1, K, H, W]
    rgb = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].float()
    refined = pamr_refine(masks, rgb, params)[0].argmax(dim=0).numpy().astype(np.uint8)
    return median_filter(refined, size=params.median) if params.median > 1 else refined


def _densecrf():
    try:
        from pydensecrf import densecrf, utils
    except ImportError:
        raise MissingExtraError(
            "postprocess='crf' needs the dense CRF package pydensecrf2, which is not installed; install the "
            "extra: pip install 'difffeat[crf]' (it compiles, so it needs a C++ compiler), or use "
            "postprocess='pamr' or 'none'"
        ) from None
    return densecrf, utils


def dense_crf_labels(scores: np.ndarray, image: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """Labels ``uint8 [H, W]`` from decision scores ``[K, H, W]`` (read as unnormalised probabilities,
    clipped at 1e-5: unary = -log score) and the RGB image ``uint8 [H, W, 3]`` by mean-field inference of
    the dense CRF with a Gaussian and a bilateral kernel (Potts compatibilities ``pos_w``, ``bi_w``)."""
    densecrf, utils = _densecrf()
    k, h, w = scores.shape
    crf = densecrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(scores.astype(np.float32), clip=1e-5)))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=np.array(image, dtype=np.uint8, order="C"),
                             compat=params.bi_w)  # fmt: skip
    q = np.asarray(crf.inference(params.iterations)).reshape(k, h, w)
    return q.argmax(axis=0).astype(np.uint8)


def check_postprocess(method: str) -> None:
    """A clear error for an unknown method, and for ``crf`` without its package (before any forward)."""
    if method not in POSTPROCESS:
        raise ConfigError(f"postprocess={method!r} is not one of {POSTPROCESS}")
    if method == "crf":
        _densecrf()


def postprocess_labels(method: str, scores: torch.Tensor, labels: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """Apply ``method`` ("none", "pamr", "crf") to one image's decision: ``scores`` ``[K, H, W]`` (background
    first) and their argmax ``labels`` ``uint8 [H, W]`` at the size of ``image`` ``uint8 [H, W, 3]``."""
    if method == "none":
        return labels
    if image is None:
        raise ConfigError(f"postprocess={method!r} needs the image")
    if tuple(image.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    if method == "pamr":
        return pamr_labels(labels, image, int(scores.shape[0]))
    if method == "crf":
        return dense_crf_labels(scores.float().cpu().numpy(), image)
    raise ConfigError(f"postprocess={method!r} is not one of {POSTPROCESS}")
