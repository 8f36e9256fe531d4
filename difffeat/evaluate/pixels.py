"""Feature vectors at chosen pixels of a dense label grid, without building the upsampled feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pixel_features"]


def pixel_features(maps: Sequence[torch.Tensor], idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Feature vectors ``[n, sum C_i]`` at flat pixel indices ``idx`` of the ``grid = (H, W)`` grid: each
    ``[C_i, h_i, w_i]`` map sampled bilinearly at the pixel centres, which equals ``F.interpolate(map, grid,
    mode="bilinear", align_corners=False)`` read at those pixels (edges clamped alike), without building it."""
    h, w = grid
    ys, xs = (idx // w).float(), (idx % w).float()
    g = torch.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], dim=-1)[None, None]  # [1, 1, n, 2]
    out = []
    for m in maps:
        s = F.grid_sample(m[None].float(), g.to(m.device), mode="bilinear", padding_mode="border", align_corners=False)
        out.append(s[0, :, 0, :].T)  # [n, C_i]
    return torch.cat(out, dim=1)
