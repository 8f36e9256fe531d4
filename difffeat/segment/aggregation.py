"""GOCA auto aggregation: per-pixel head weights (inside the attention computation) and per-layer weights
from a reference feature's pseudo self-attention.

Shapes: B batch, h heads, q query pixels of a chunk, K keys, T text tokens, C output channels, d head dim.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..capture.attention_kernels import dense_linear
from ..capture.observer import AttentionTensors
from ..errors import ConfigError
from .selfmaps import resize_self_map, resize_self_map_adjoint  # noqa: F401  (resize_self_map: the former path)

__all__ = ["goca_head_weights", "goca_head_weights_from_outputs", "gram_break_even_rows", "layer_weights", "combine_layers", "pseudo_attention",
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


def goca_head_weights_from_outputs(out_bqhd: torch.Tensor, w_out_chd: torch.Tensor | None, gram: torch.Tensor | None = None,
                                   w_out_t: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`goca_head_weights` of ``o_n(i) = W_O^n out_n(i)`` without forming the ``[B, heads, q, C]``
    contributions: with ``o(i) = sum_n o_n(i) = W_O out(i)`` (``out(i)`` the heads' outputs concatenated),

    ``<o_n(i), o(i)> = out_n(i) . (W_O^T o(i))_n = out_n(i) . (G out(i))_n``,  ``G = W_O^T W_O``,

    and ``||o(i)||^2 = sum_n <o_n(i), o(i)>``. One ``[q, heads*d] x [heads*d, C]`` product and its transpose
    (``gram`` None), or one ``[q, heads*d] x [heads*d, heads*d]`` product with ``gram`` = ``G`` given.

    Args:
        out_bqhd: each head's attention output ``[B, q, heads, d]``.
        w_out_chd: ``W_O`` as ``[C, heads, d]`` (or ``[C, heads*d]``); not used (may be None) with ``gram``.
        gram: optional ``W_O^T W_O`` ``[heads*d, heads*d]``.
        w_out_t: optional ``W_O^T`` ``[heads*d, C]`` contiguous (made from ``w_out_chd`` when None).
    Returns:
        ``[B, heads, q]``, as :func:`goca_head_weights`.
    """
    b, q, h, d = out_bqhd.shape
    flat = out_bqhd.reshape(b, q, h * d)
    if gram is None:
        w = w_out_chd.reshape(w_out_chd.shape[0], h * d)
        o_bqc = dense_linear(flat, w)
        back = dense_linear(o_bqc, w.t().contiguous() if w_out_t is None else w_out_t)  # W_O^T o(i), [B, q, heads*d]
        norm = o_bqc.pow(2).sum(-1)
    else:
        back = dense_linear(flat, gram)  # G is symmetric: flat @ G = flat @ G^T
        norm = None
    dots = (back.view(b, q, h, d) * out_bqhd).sum(-1)  # [B, q, heads]
    if norm is None:
        norm = dots.sum(-1)
    return (dots / norm.clamp_min(_EPS).unsqueeze(-1)).transpose(1, 2)


def gram_break_even_rows(c: int, hd: int) -> float:
    """Query rows after which forming ``G = W_O^T W_O`` once (``2 C (h d)^2`` flops) costs less than the two
    ``W_O`` products per row it replaces (``4 C h d`` flops against ``2 (h d)^2`` per row with ``G``):
    ``C h d / (2 C - h d)``; never (infinity) where ``h d >= 2 C``. ``C`` when ``h d = C``."""
    return c * hd / (2 * c - hd) if hd < 2 * c else float("inf")


@dataclass
class _LayerForms:
    """What :class:`GocaHeadReducer` keeps for one layer: ``W_O^T W_O`` once formed (``[h d, h d]`` float32,
    kept while ``weight`` is the same tensor at the same ``_version``), the rows it reduced before the
    Gram existed, and for the call in progress the float32 ``W_O`` and ``W_O^T`` (dropped when its last row
    is reduced)."""

    weight: torch.Tensor
    version: int
    gram: torch.Tensor | None = None
    rows_before: int = 0  # rows of earlier calls reduced without the Gram
    call: Any = None  # weakref to the AttentionTensors of the call in progress
    call_rows: int = 0
    done_rows: int = 0
    w: torch.Tensor | None = None  # [C, h d] float32, this call's (no Gram)
    wt: torch.Tensor | None = None  # [h d, C] float32 contiguous, this call's (no Gram)


class GocaHeadReducer:
    """Map reducer computing GOCA's head-weighted map ``A_m(i,:) = sum_n w_n(i) A_n(i,:)`` chunk by chunk,
    so no ``[heads, HW, T]`` tensor outlives a chunk.

    ``o_n(i) = (A_n V_n W_O^n)(i)`` uses every key the layer attends to (for joint attention, image and
    text keys), ``W_O^n`` being head n's column slice of the output projection (no bias). The weights are
    computed by :func:`goca_head_weights_from_outputs` (no per-head ``[q, C]`` contributions).

    One reducer serves every layer and every call (a :class:`~difffeat.segment.Segmenter` keeps one for all its
    observations). Per layer it converts ``W_O`` to float32 once per call (not per chunk), and forms
    ``G = W_O^T W_O`` once the layer's query rows over all calls reach :func:`gram_break_even_rows` (the rows
    of a call counted at its start: all chunks of one call use the same form); from then on each chunk needs
    one ``[q, h d] x [h d, h d]`` product instead of two ``[q, h d] x [h d, C]`` ones (the cost of ``G`` is at
    most repaid by then: a rent-or-buy rule, within 2x of the cheaper choice in hindsight). ``G`` is kept while
    ``W_O`` is the same tensor, unmodified (same ``_version``): ``(h d)^2`` float32 per layer (SD3.5 Medium,
    ``h d = 1536``: 9 MiB a layer). The two forms agree to float32 rounding.

    Args:
        output_weights: optional ``{id(attn_module): W_O}`` for modules without ``to_out``.
    """

    #: receives the chunk's attention output ``out_bhqd`` from :func:`~difffeat.capture.observer.attention_probs`
    uses_output = True
    #: chunks of one layer may be reduced on several threads at once (the per-layer state is kept under a lock)
    thread_safe = True

    def __init__(self, output_weights: dict[int, torch.Tensor] | None = None) -> None:
        self.output_weights = output_weights or {}
        self._layers: dict[int, _LayerForms] = {}  # id(attn) -> that layer's forms
        self._lock = threading.Lock()

    def kept_bytes(self) -> int:
        """Bytes this reducer keeps between calls (the Gram matrices formed so far)."""
        with self._lock:
            return sum(f.gram.numel() * f.gram.element_size() for f in self._layers.values() if f.gram is not None)

    def _forms(self, attn: Any, weight: torch.Tensor, tensors: AttentionTensors, rows: int, hd: int
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(W_O, W_O^T, None)`` (float32, this call's) or ``(None, None, G)`` for a chunk of ``rows`` rows of
        the call ``tensors``; the call's form is decided when its first chunk arrives."""
        with self._lock:
            forms = self._layers.get(id(attn))
            if forms is None or forms.weight is not weight or forms.version != weight._version:
                forms = self._layers[id(attn)] = _LayerForms(weight, weight._version)
            if forms.call is None or forms.call() is not tensors or forms.done_rows >= forms.call_rows:
                # a new call of this layer (or the same tensors observed again)
                forms.rows_before += forms.done_rows if forms.gram is None else 0
                forms.call, forms.done_rows, forms.w, forms.wt = weakref.ref(tensors), 0, None, None
                forms.call_rows = tensors.q.shape[0] * tensors.q.shape[2]
                if forms.gram is None:
                    w = weight[:, :hd].float()  # [C, h d]
                    if forms.rows_before + forms.call_rows >= gram_break_even_rows(w.shape[0], hd):
                        forms.gram = torch.matmul(w.t(), w)
                    else:
                        forms.w, forms.wt = w, w.t().contiguous()
            w, wt, gram = forms.w, forms.wt, forms.gram
            forms.done_rows += rows
            if forms.done_rows >= forms.call_rows:  # the call's last chunk: its float32 W_O is not needed again
                forms.w = forms.wt = None
            return w, wt, gram

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
        if out_bhqd is None:
            out_bhqd = torch.matmul(full_probs_bhqk, tensors.v.float())
        w, wt, gram = self._forms(attn, weight, tensors, b * q, h * d)
        w_bhq = goca_head_weights_from_outputs(out_bhqd.transpose(1, 2), w, gram, wt)
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
