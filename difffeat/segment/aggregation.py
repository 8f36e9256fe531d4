"""GOCA auto aggregation: per-pixel head weights (inside the attention computation) and per-layer weights
from a reference feature's pseudo self-attention.

Shapes: B batch, h heads, q query pixels of a chunk, K keys, T text tokens, C output channels, d head dim.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..capture.attention_kernels import dense_linear
from ..capture.observer import AttentionTensors
from ..errors import ConfigError
from .selfmaps import resize_self_map, resize_self_map_adjoint  # noqa: F401  (resize_self_map: the former path)

__all__ = ["goca_head_weights", "goca_head_weights_from_outputs", "layer_weights", "combine_layers", "pseudo_attention",
           "reference_tokens", "weights_from_scores"]

_EPS = 1e-12


def goca_head_weights(o_bhqc: torch.Tensor) -> torch.Tensor:
    """Head weights ``w_n(i) = <o_n(i), o(i)> / ||o(i)||^2`` with ``o(i) = sum_n o_n(i)``.

    Args:
        o_bhqc: each head's contribution to the output projection, ``[B, heads, q, C]``.
    Returns:
        ``[B, heads, q]``; sums to 1 over heads (where ``o(i) != 0``); may be negative; not clamped.
    """
    o_bqc = o_bhqc.sum(dim=1)
    dots = torch.einsum("bhqc,bqc->bhq", o_bhqc, o_bqc)
    return dots / o_bqc.pow(2).sum(-1).clamp_min(_EPS).unsqueeze(1)


class FixedHeadWeights:
    """Map reducer with one fixed weight per head, the same at every pixel: ``A_m = sum_n w_n A_n``.

    Not part of GOCA (its weights vary per pixel); for experiments with head weights chosen some other way,
    through ``Segmenter.observe(..., head_reducers=...)``. ``[1/heads] * heads`` reproduces the head mean and a
    one-hot vector one head's own map.

    Args:
        weights: one weight per head of the layer it is used on.
    """

    #: a pure function of its chunk: chunks may be reduced on several threads at once
    thread_safe = True

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = torch.as_tensor(list(weights), dtype=torch.float32)
        if self.weights.ndim != 1 or len(self.weights) == 0:
            raise ValueError(f"FixedHeadWeights needs a flat list of one weight per head, got {list(weights)!r}")

    def __call__(self, probs_bhqk: torch.Tensor, **_: Any) -> torch.Tensor:
        if probs_bhqk.shape[1] != len(self.weights):
            raise ConfigError(
                f"FixedHeadWeights has {len(self.weights)} weight(s) but the layer has {probs_bhqk.shape[1]} heads; "
                "give one weight per head"
            )
        return torch.einsum("h,bhqk->bqk", self.weights.to(probs_bhqk), probs_bhqk)


def head_output_weight(attn: Any, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """``W_O`` of an attention module: ``to_out[0].weight`` ``[C, heads*d]`` (or ``to_out.weight`` when it is
    one linear layer: FLUX.2 single-stream blocks, whose first ``heads*d`` input columns are the attention
    part); ``fallback`` for modules without an output projection (FLUX single-stream blocks project through
    the block's ``proj_out``)."""
    to_out = getattr(attn, "to_out", None)
    if isinstance(to_out, torch.nn.Linear):
        return to_out.weight
    if to_out is not None:
        return to_out[0].weight
    if fallback is None:
        raise ValueError("this attention module has no output projection; pass its W_O explicitly")
    return fallback


def goca_head_weights_from_outputs(out_bqhd: torch.Tensor, w_out_chd: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`goca_head_weights` of ``o_n(i) = W_O^n out_n(i)`` without forming the ``[B, heads, q, C]``
    contributions: with ``o(i) = sum_n o_n(i) = W_O out(i)`` (``out(i)`` the heads' outputs concatenated),

    ``<o_n(i), o(i)> = out_n(i) . (W_O^T o(i))_n = out_n(i) . (G out(i))_n``,  ``G = W_O^T W_O``,

    and ``||o(i)||^2 = sum_n <o_n(i), o(i)>``. One ``[q, heads*d] x [heads*d, C]`` product and its transpose
    (``gram`` None), or one ``[q, heads*d] x [heads*d, heads*d]`` product with ``gram`` = ``G`` given.

    Args:
        out_bqhd: each head's attention output ``[B, q, heads, d]``.
        w_out_chd: ``W_O`` as ``[C, heads, d]``.
        gram: optional ``W_O^T W_O`` ``[heads*d, heads*d]``.
    Returns:
        ``[B, heads, q]``, as :func:`goca_head_weights`.
    """
    b, q, h, d = out_bqhd.shape
    flat = out_bqhd.reshape(b, q, h * d)
    w = w_out_chd.reshape(w_out_chd.shape[0], h * d)
    if gram is None:
        o_bqc = dense_linear(flat, w)
        back = dense_linear(o_bqc, w.t().contiguous())  # W_O^T o(i), [B, q, heads*d]
        norm = o_bqc.pow(2).sum(-1)
    else:
        back = dense_linear(flat, gram)  # G is symmetric: flat @ G = flat @ G^T
        norm = None
    dots = (back.view(b, q, h, d) * out_bqhd).sum(-1)  # [B, q, heads]
    if norm is None:
        norm = dots.sum(-1)
    return (dots / norm.clamp_min(_EPS).unsqueeze(-1)).transpose(1, 2)


class GocaHeadReducer:
    """Map reducer computing GOCA's head-weighted map ``A_m(i,:) = sum_n w_n(i) A_n(i,:)`` chunk by chunk,
    so no ``[heads, HW, T]`` tensor outlives a chunk.

    ``o_n(i) = (A_n V_n W_O^n)(i)`` uses every key the layer attends to (for joint attention, image and
    text keys), ``W_O^n`` being head n's column slice of the output projection (no bias). The weights are
    computed by :func:`goca_head_weights_from_outputs` (no per-head ``[q, C]`` contributions), with
    ``W_O^T W_O`` formed once per layer where the layer has at least as many query rows as output channels
    (then one ``[q, heads*d]^2``-sized product per chunk is the cheaper form).

    Args:
        output_weights: optional ``{id(attn_module): W_O}`` for modules without ``to_out``.
    """

    #: receives the chunk's attention output ``out_bhqd`` from :func:`~difffeat.capture.observer.attention_probs`
    uses_output = True
    #: chunks of one layer may be reduced on several threads at once (the per-layer ``W_O^T W_O`` is made once)
    thread_safe = True

    def __init__(self, output_weights: dict[int, torch.Tensor] | None = None) -> None:
        self.output_weights = output_weights or {}
        self._grams: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(attn): (W_O, its version, Gram)
        self._lock = threading.Lock()

    def _gram(self, attn: Any, weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``W_O^T W_O`` of ``w`` (= ``weight``'s attention columns, float32), made once per layer and kept
        while ``weight`` is the same tensor, unmodified."""
        with self._lock:
            held = self._grams.get(id(attn))
            if held is None or held[0] is not weight or held[1] != weight._version:
                held = (weight, weight._version, torch.matmul(w.t(), w))
                self._grams[id(attn)] = held
            return held[2]

    def __call__(
        self,
        probs_bhqk: torch.Tensor,
        *,
        attn: Any,
        tensors: AttentionTensors,
        rows: slice,
        full_probs_bhqk: torch.Tensor,
        out_bhqd: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, h, q, _ = full_probs_bhqk.shape
        d = tensors.v.shape[-1]
        weight = head_output_weight(attn, self.output_weights.get(id(attn)))
        w_out = weight[:, : h * d].float()  # [C, heads*d]
        if out_bhqd is None:
            out_bhqd = torch.matmul(full_probs_bhqk, tensors.v.float())
        gram = self._gram(attn, weight, w_out) if tensors.q.shape[2] >= w_out.shape[0] else None
        w_bhq = goca_head_weights_from_outputs(out_bhqd.transpose(1, 2), w_out.view(-1, h, d), gram)
        return torch.einsum("bhq,bhqk->bqk", w_bhq, probs_bhqk)


def reference_tokens(ref_bchw: torch.Tensor, first_channel: bool = False) -> torch.Tensor:
    """The reference feature as pixel tokens ``[B, HW, C]`` (float32) for :func:`pseudo_attention`: every
    channel, or channel 0 only (``first_channel``, the published ``ref_channels="first"``: ``C = 1``)."""
    if first_channel:
        ref_bchw = ref_bchw[:, :1]
    return ref_bchw.float().flatten(2).transpose(1, 2)


def pseudo_attention(f_bqc: torch.Tensor, f_bkc: torch.Tensor) -> torch.Tensor:
    """Rows of GOCA's pseudo self-attention ``P = softmax(F F^T / sqrt(C))`` over pixels.

    Args:
        f_bqc: the reference tokens ``[B, q, C]`` of the rows wanted (all of them: the whole ``P``).
        f_bkc: every reference token ``[B, HW, C]`` (:func:`reference_tokens`).
    Returns:
        ``[B, q, HW]``; each row sums to 1. A block of rows equals the same rows of the whole ``P`` up to
        float rounding (the row block's own matrix product).
    """
    c = f_bkc.shape[-1]
    return torch.softmax(torch.matmul(f_bqc, f_bkc.transpose(1, 2)) / c**0.5, dim=-1)


def weights_from_scores(scores_bm: torch.Tensor) -> torch.Tensor:
    """Layer weights from the layer scores ``s_m = <P, U(S_m)>`` ``[B, M]``: clamped at 0 and normalised to
    sum 1 (uniform where every score is <= 0)."""
    scores = scores_bm.clamp_min(0)
    total = scores.sum(dim=1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[1])
    return torch.where(total > 0, scores / total.clamp_min(_EPS), uniform)


def layer_weights(
    ref_bchw: torch.Tensor,
    self_maps: list[torch.Tensor],
    grids: list[tuple[int, int]],
    first_channel: bool = False,
    mass_preserving: bool = True,
) -> torch.Tensor:
    """GOCA layer weights ``s_m = sum_ij P_ij S_m,ij``, clamped at 0 and normalised to sum 1.

    ``P = softmax(F F^T / sqrt(C))`` over pixels (:func:`pseudo_attention`) is the pseudo self-attention of the
    reference feature ``F`` at its own grid. ``S_m`` is layer m's head-averaged self-attention, resized to the reference grid
    (``U`` = :func:`~difffeat.segment.selfmaps.resize_self_map`); the score is computed in the adjoint form ``<U^T P, S_m>``
    (:func:`~difffeat.segment.selfmaps.resize_self_map_adjoint`), equal to ``<P, U(S_m)>`` without building any resized map.
    The two-pass observation forms the same scores during the forward (:mod:`difffeat.segment.layerscores`).

    Args:
        ref_bchw: reference dense feature ``[B, C, H, W]``.
        self_maps: per layer ``[B, HW_m, HW_m]``.
        grids: per layer (h_m, w_m).
        first_channel: use channel 0 only (``C = 1``, scale 1), as the published code does (setting
            ``ref_channels="first"``); False (``"all"``) is difffeat's variant.
        mass_preserving: the resize's ``mass_preserving`` (published: False).
    Returns:
        ``[B, M]`` (uniform where every score is <= 0).
    """
    h, w = ref_bchw.shape[-2:]
    f = reference_tokens(ref_bchw, first_channel)  # [B, HW, C]
    p = pseudo_attention(f, f)
    adjoint: dict[tuple[int, int], torch.Tensor] = {}  # one U^T P per self-map grid, shared by its layers
    scores = []
    for s_map, g in zip(self_maps, grids):
        g = tuple(g)
        if g not in adjoint:
            adjoint[g] = resize_self_map_adjoint(p, g, (h, w), mass_preserving)
        scores.append((adjoint[g] * s_map.float()).sum(dim=(1, 2)))
    return weights_from_scores(torch.stack(scores, dim=1))


def combine_layers(
    maps: list[torch.Tensor], grids: list[tuple[int, int]], weights_bm: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Global map ``A = sum_m s_m upsample(A_m)``, clamped at 0, each pixel renormalised to sum 1 over
    text positions.

    Args:
        maps: per layer ``[B, HW_m, T]`` (head-aggregated cross maps).
        grids: per layer (h_m, w_m).
        weights_bm: ``[B, M]`` layer weights.
        size: output (H, W).
    Returns:
        ``[B, T, H, W]``.
    """
    total = None
    for m, (a, (h, w)) in enumerate(zip(maps, grids)):
        spatial = a.float().transpose(1, 2).reshape(a.shape[0], a.shape[2], h, w)
        spatial = F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)
        term = weights_bm[:, m, None, None, None] * spatial
        total = term if total is None else total + term
    total = total.clamp_min(0)
    return total / total.sum(dim=1, keepdim=True).clamp_min(_EPS)
