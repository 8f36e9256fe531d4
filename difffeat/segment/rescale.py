"""GOCA per-pixel rescaling and the map post-processing shared by every configuration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["class_scores", "rescale_by_content", "gaussian_blur", "minmax"]

_EPS = 1e-12


def class_scores(a_bthw: torch.Tensor, token_groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """``S_c(i) = mean over c's tokens of A(i, t)``: ``[B, T, H, W]`` -> ``[B, n_groups, H, W]``."""
    return torch.stack([a_bthw[:, list(g)].mean(dim=1) for g in token_groups], dim=1)


def rescale_by_content(s_bnhw: torch.Tensor, a_bthw: torch.Tensor, content_tokens: Sequence[int]) -> torch.Tensor:
    """Per-pixel rescaling ``S'_c(i) = S_c(i) / R(i)``, ``R(i) = sum over content tokens of A(i, t)``:
    a pixel whose attention goes mostly to non-content tokens is not penalised for it."""
    r = a_bthw[:, list(content_tokens)].sum(dim=1, keepdim=True)
    return s_bnhw / r.clamp_min(_EPS)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 5, sigma: float = 1.1) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, N, H, W]`` maps (reflect padding)."""
    if kernel_size <= 1:
        return x
    half = kernel_size // 2
    coords = torch.arange(kernel_size, dtype=torch.float32, device=x.device) - half
    k = torch.exp(-(coords**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    b, n, h, w = x.shape
    y = x.reshape(b * n, 1, h, w)
    mode = "reflect" if min(h, w) > half else "replicate"
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode=mode), k.view(1, 1, -1, 1))
    return y.reshape(b, n, h, w)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``[H, W]`` map of ``[B, N, H, W]`` to [0, 1] (constant maps become 0)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(_EPS)
