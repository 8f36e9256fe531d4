"""S-CFG (semantic-aware classifier-free guidance) with GOCA masks, as the GOCA paper's generation experiment
runs it (Darkbblue/goca, ``src-additional/generation-experiment``), on tensors only: no pipeline here.

At every denoising step the conditional and unconditional halves of the CFG batch give per-token region
masks (:func:`token_masks`: each pixel's most-attended prompt token, and a foreground mask), the guidance
strength of each region is rescaled so that every region gets the foreground's mean guidance norm
(:func:`scfg_rate`), and the guided prediction is ``u + w * rate * (c - u)`` (:func:`guided_prediction`).
With the rate fixed to 1 it is plain classifier-free guidance, computed by the same expression as
diffusers' pipelines compute it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from ..segment.rescale import gaussian_blur, minmax
from ..segment.selfmaps import propagate

__all__: list[str] = []  # all listed by the package (difffeat.tracing) or the facade

#: ``--guidance`` values: plain CFG, S-CFG with GOCA masks, S-CFG with its own (vanilla) masks
GUIDANCE_MODES = ("cfg", "scfg-goca", "scfg")

_EPS = 1e-8  # the published rate's denominators


@dataclass(frozen=True)
class SCFG:
    """Guidance settings of a traced generation (:func:`difffeat.trace`).

    Attributes:
        guidance_scale: ``w`` of ``u + w * rate * (c - u)``; S-CFG needs classifier-free guidance, so > 1.
        mode: "scfg-goca" (GOCA masks: GOCA head and layer weights, per-pixel rescaling), "scfg" (S-CFG's
            own masks: head mean, uniform layers, no rescaling) or "cfg" (rate fixed to 1: plain CFG).
        rate_min / rate_max: the clamp of the rate map (published: 0.8, 3.0).
        scale_cap: the rate is also capped at ``scale_cap / guidance_scale`` (published: 15).
        smooth_kernel / smooth_sigma: the rate map's smoothing (:func:`published_smoothing_kernel`;
            published: 3, 0.5).
    """

    guidance_scale: float
    mode: str = "scfg-goca"
    rate_min: float = 0.8
    rate_max: float = 3.0
    scale_cap: float = 15.0
    smooth_kernel: int = 3
    smooth_sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise InvalidOptionError(f"unknown guidance {self.mode!r}; use one of {', '.join(GUIDANCE_MODES)}")
        gs = self.guidance_scale
        if isinstance(gs, bool) or not isinstance(gs, (int, float)) or not math.isfinite(gs) or gs <= 1:
            raise InvalidOptionError(
                f"guidance_scale {gs!r}: S-CFG and CFG guide the conditional prediction away from the "
                "unconditional one, which needs classifier-free guidance: use a guidance_scale > 1 (e.g. 7.5)"
            )
        if not 0 < self.rate_min <= self.rate_max:
            raise InvalidOptionError(f"rate clamp [{self.rate_min}, {self.rate_max}] must satisfy 0 < min <= max")
        if self.smooth_kernel < 1 or self.smooth_kernel % 2 == 0:
            raise InvalidOptionError(f"smooth_kernel must be an odd integer >= 1, got {self.smooth_kernel}")

    @property
    def uses_masks(self) -> bool:
        return self.mode != "cfg"


def published_smoothing_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The rate map's smoothing kernel ``[size, size]`` exactly as the published code builds it:
    ``k(x, y) ∝ exp(-((x - m) / (2 sigma))^2) * exp(-((y - m) / (2 sigma))^2)``, ``m = (size - 1) / 2``,
    normalised to sum 1. (Note ``(d / 2sigma)^2``, not the textbook ``d^2 / 2sigma^2``: with sigma = 0.5 the
    weights are ``exp(-d^2)``.)"""
    d = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-((d / (2 * sigma)) ** 2))
    k = k1[:, None] * k1[None, :]
    return k / k.sum()


def scfg_rate(
    delta_bchw: torch.Tensor,
    token_mask_bthw: torch.Tensor,
    fore_mask_b1hw: torch.Tensor,
    s: SCFG,
) -> torch.Tensor:
    """S-CFG's per-pixel guidance rate ``[B, 1, h, w]`` (float32) from the guidance direction
    ``delta = c - u`` ``[B, C, h, w]`` and region masks at the latent grid.

    ``n(i) = ||delta(i)||_2`` over channels; per token region ``t`` (one-hot ``M_t``) its mean norm
    ``d_t = sum_i n M_t / (sum_i M_t + 1e-8)``; the foreground mean ``f`` likewise over ``M_fore``; the rate of
    a pixel is ``sum_t [|M_t| > 0] f / (d_t + 1e-8) M_t(i)``, clamped to ``[rate_min, rate_max]`` and at most
    ``scale_cap / w``, then smoothed (reflect padding, :func:`published_smoothing_kernel`)."""
    norm = delta_bchw.float().norm(dim=1, keepdim=True)  # [B, 1, h, w]
    masks = token_mask_bthw.float()
    fore = fore_mask_b1hw.float()
    region_norm = (norm * masks).sum(dim=(2, 3)) / (masks.sum(dim=(2, 3)) + _EPS)  # [B, T]
    fore_norm = (norm * fore).sum(dim=(2, 3)) / (fore.sum(dim=(2, 3)) + _EPS)  # [B, 1]
    present = (masks.sum(dim=(2, 3)) > 0).float()
    per_token = fore_norm * present / (region_norm + _EPS)  # [B, T]
    rate = torch.einsum("bt,bthw->bhw", per_token, masks).unsqueeze(1)
    rate = rate.clamp(min=s.rate_min, max=s.rate_max).clamp_max(s.scale_cap / s.guidance_scale)
    half = s.smooth_kernel // 2
    kernel = published_smoothing_kernel(s.smooth_kernel, s.smooth_sigma).to(rate.device)
    return F.conv2d(F.pad(rate, (half, half, half, half), mode="reflect"), kernel[None, None])


def guided_prediction(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, rate: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """``u + (w * rate) * (c - u)``; with ``rate = 1.0`` (a number) this is diffusers' own CFG expression
    ``u + w * (c - u)``, operation for operation."""
    scale = guidance_scale * rate if isinstance(rate, float) else guidance_scale * rate.to(cond.dtype)
    return uncond + scale * (cond - uncond)


def token_masks(
    a_cond_bthw: torch.Tensor,
    a_uncond_bthw: torch.Tensor,
    refine_bqk: torch.Tensor | None,
    content_tokens: Sequence[int],
    last_content: int,
    global_token: tuple[str, int],
    rescale: bool,
    refine_order: int = 2,
    blur_kernel: int = 5,
    blur_sigma: float = 1.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S-CFG's region masks from the global maps of the two CFG halves (as the published ``get_mask``).

    Conditional half: ``A / sum_{content} A`` (with ``rescale``, GOCA's per-pixel rescaling), Gaussian blur,
    min-max per token, self-attention propagation (``refine_order``, min-max), tokens after the last content
    token zeroed; the token mask is the one-hot argmax over tokens (ties: every maximal token). Foreground:
    the global token's map (``global_token`` = ("uncond", position) or ("cond", position)) propagated,
    blurred, min-maxed: foreground where it is below 0.5 (``g < 1 - g``).

    Args:
        a_cond_bthw / a_uncond_bthw: GOCA global maps ``[B, T, H, W]`` of the two halves.
        refine_bqk: the conditional half's mean self map ``[B, HW, HW]`` (None: no propagation).
    Returns:
        token masks ``[B, T, H, W]`` and foreground mask ``[B, 1, H, W]`` (float 0/1).
    """
    x = a_cond_bthw.float()
    if rescale:
        x = x / x[:, list(content_tokens)].sum(dim=1, keepdim=True).clamp_min(1e-12)
    x = minmax(gaussian_blur(x, blur_kernel, blur_sigma))
    source, pos = global_token
    g = (a_cond_bthw if source == "cond" else a_uncond_bthw)[:, pos : pos + 1].float()
    if refine_bqk is not None and refine_order > 0:
        x = propagate(x, refine_bqk, refine_order)
        g = propagate(g, refine_bqk, refine_order)
    x = x.clone()
    x[:, last_content + 1 :] = 0
    token_mask = (x == x.amax(dim=1, keepdim=True)).float()
    g = minmax(gaussian_blur(g, blur_kernel, blur_sigma))
    fore = (g < 1 - g).float()
    return token_mask, fore
