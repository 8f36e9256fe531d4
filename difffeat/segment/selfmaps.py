"""The self-attention maths of GOCA, written once: the resize ``U`` of a self map to another grid, its
adjoint, the mean of the refinement maps, propagation, and the streamed form that reduces the maps during
the forward.

The decision uses self-attention twice (method.md §3): the layer score ``<P, U(S_m)>`` with ``S_m`` resized
to the reference grid, and the propagation ``X <- S^k X`` with the mean of the refinement blocks' maps.

``U(S) = c N_q S B_k^T`` (:func:`resize_self_map`): nearest ``N_q`` over query pixels, bilinear ``B_k`` over key
pixels, ``c = hw / (Ht Wt)`` when mass-preserving. Row selection commutes with the row-wise key resize, so
``U(S) = resize_keys(S[nearest_rows])`` (:func:`resize_keys`, :func:`nearest_rows`), and every fast form below
is built from these two functions or from their matrices:

* :func:`resize_self_map_adjoint` ``U^T P = c N_q^T P B_k``, the per-axis matrices read off ``F.interpolate``
  (the layer score ``<U^T P, S_m>`` needs no resized map);
* :class:`SelfMapStream` gives one map reducer per self map that, chunk of query rows by chunk, keeps only
  what the decision needs:

  - a layer-weight map finer than the reference grid is kept as ``U(S_m)`` at the reference grid: of each
    chunk the query rows that ``nearest_rows`` picks, through ``resize_keys`` (so the values are those of
    ``resize_self_map``), written into a reference-grid buffer; a map on the reference grid or coarser is kept
    as it is (the adjoint form of ``layer_weights`` handles it);
  - the refinement maps are summed into one ``[B, HW, HW]`` buffer; a refinement block that is not also a
    layer-weight block keeps nothing of its own.

So the maps one segmentation keeps are one ``[HW, T]`` cross map per layer, at most one reference-grid map
per layer, and one ``[HW, HW]`` refinement sum, instead of a ``[HW, HW]`` map per block.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .rescale import minmax

__all__ = ["grid_of", "nearest_rows", "resize_keys", "resize_keys_adjoint", "resize_self_map", "resize_self_map_adjoint",
           "mean_self_map", "propagate", "SelfMapStream", "TargetRows"]


def grid_of(n_tokens: int, base: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a level with ``n_tokens`` pixels, from the input grid ``base`` (power-of-two levels)."""
    h, w = base
    for s in (1, 2, 4, 8, 16, 32, 64):
        gh, gw = math.ceil(h / s), math.ceil(w / s)
        if gh * gw == n_tokens:
            return gh, gw
    raise ValueError(f"{n_tokens} tokens do not fit the grid {h}x{w}")


def nearest_rows(grid: tuple[int, int], target: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Index ``[Ht*Wt]`` of the source pixel that ``F.interpolate(mode="nearest")`` picks for each target pixel
    when resizing ``grid`` (h, w) to ``target`` (Ht, Wt) (exact: the indices are interpolated as floats < 2**24)."""
    h, w = grid
    idx = torch.arange(h * w, dtype=torch.float32, device=device).view(1, 1, h, w)
    return F.interpolate(idx, size=tuple(target), mode="nearest").flatten().long()


def resize_keys(s_brk: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], mass_preserving: bool) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of each row ``[h*w]`` of ``s_brk`` ``[B, r, h*w]`` over key pixels
    from ``grid`` (h, w) to ``target`` (Ht, Wt): ``[B, r, Ht*Wt]``, times ``(h*w) / (Ht*Wt)`` when
    ``mass_preserving`` (each row keeps its sum). Row by row: the rows do not affect each other."""
    b, r, _ = s_brk.shape
    (h, w), (th, tw) = grid, target
    keys = F.interpolate(s_brk.reshape(b * r, 1, h, w), size=(th, tw), mode="bilinear", align_corners=False)
    if mass_preserving:
        keys = keys * (h * w) / (th * tw)
    return keys.reshape(b, r, th * tw)


def resize_self_map(
    s_bqk: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], mass_preserving: bool = True
) -> torch.Tensor:
    """``U(S)``: resize a self-attention map ``[B, HW, HW]`` from ``grid`` to ``target``: bilinear over key pixels,
    nearest over query pixels. Returns ``[B, Ht*Wt, Ht*Wt]``.

    ``mass_preserving`` (difffeat's variant, setting ``self_map_resize="mass-preserving"``) multiplies every
    row by ``(h*w) / (Ht*Wt)`` so it keeps summing to 1; the published code does not (``"plain"``), so a map
    resized from h*w to Ht*Wt pixels carries a factor ``(Ht*Wt) / (h*w)``.

    The query rows are picked before the key resize when that resizes fewer rows, after it otherwise; the
    two orders give the same values (the key resize is row by row).
    """
    (h, w), (th, tw) = grid, target
    if (h, w) == (th, tw):
        return s_bqk
    rows = nearest_rows(grid, target, s_bqk.device)  # [Ht*Wt]
    if th * tw <= h * w:
        return resize_keys(s_bqk[:, rows], grid, target, mass_preserving)
    return resize_keys(s_bqk, grid, target, mass_preserving)[:, rows]


def _axis_resamplers(n_from: int, n_to: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D resampling matrices ``[n_to, n_from]`` of ``F.interpolate`` along one axis: bilinear
    (``align_corners=False``) and nearest (one-hot rows). Both 2-D modes are separable, so a 2-D resize is
    ``Y = M_h X M_w^T``. Built by resizing the identity, so they match ``F.interpolate`` exactly."""
    eye = torch.eye(n_from, device=device).view(n_from, 1, n_from, 1)
    bilinear = F.interpolate(eye, size=(n_to, 1), mode="bilinear", align_corners=False).view(n_from, n_to).T
    nearest = F.interpolate(eye, size=(n_to, 1), mode="nearest").view(n_from, n_to).T
    return bilinear, nearest


def resize_self_map_adjoint(
    p_bqk: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], mass_preserving: bool = True
) -> torch.Tensor:
    """The adjoint of :func:`resize_self_map`: ``U^T P`` with ``<U^T P, S> = <P, U(S)>`` for every ``S``.

    ``U(S) = c N_q S B_k^T`` (nearest ``N`` over query pixels, bilinear ``B`` over key pixels, each the
    Kronecker product of its per-axis matrices; ``c = hw / (Ht Wt)`` when ``mass_preserving``), so
    ``U^T P = c N_q^T P B_k``. Scoring a layer against ``P`` at the target grid then costs one ``[hw, hw]``
    product instead of resizing its map to ``[Ht Wt, Ht Wt]``, and layers on the same grid share it.

    Args:
        p_bqk: ``[B, Ht*Wt, Ht*Wt]`` at ``target``.
        grid: (h, w) of the self maps it will score.
    Returns:
        ``[B, h*w, h*w]``.
    """
    (h, w), (th, tw) = grid, target
    if (h, w) == (th, tw):
        return p_bqk
    b = p_bqk.shape[0]
    by, ny = _axis_resamplers(h, th, p_bqk.device)
    bx, nx = _axis_resamplers(w, tw, p_bqk.device)
    p5 = p_bqk.float().reshape(b, th, tw, th, tw)  # [B, qy, qx, ky, kx]
    p5 = torch.einsum("bijkl,ia,jc->backl", p5, ny, nx)  # queries: nearest, adjoint
    p5 = torch.einsum("backl,kd,le->bacde", p5, by, bx)  # keys: bilinear, adjoint
    g = p5.reshape(b, h * w, h * w)
    return g * ((h * w) / (th * tw)) if mass_preserving else g


def resize_keys_adjoint(
    p_brk: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], mass_preserving: bool
) -> torch.Tensor:
    """The adjoint of :func:`resize_keys`: ``[B, r, Ht*Wt]`` rows at ``target`` -> ``[B, r, h*w]`` rows at ``grid``,
    ``c P B_k`` (``B_k`` the bilinear key resize, ``c`` as in :func:`resize_self_map_adjoint`), so that
    ``<resize_keys_adjoint(P), S> = <P, resize_keys(S)>`` row by row."""
    (h, w), (th, tw) = grid, target
    b, r, _ = p_brk.shape
    by, _ = _axis_resamplers(h, th, p_brk.device)
    bx, _ = _axis_resamplers(w, tw, p_brk.device)
    g = torch.einsum("brkl,kd,le->brde", p_brk.float().reshape(b, r, th, tw), by, bx).reshape(b, r, h * w)
    return g * ((h * w) / (th * tw)) if mass_preserving else g


class TargetRows:
    """Which rows of ``U(S)`` (:func:`resize_self_map` from ``grid`` to ``target``) a block of ``S``'s query rows
    gives: every target row is source row ``nearest_rows(grid, target)[t]`` with its keys resized, so the rows
    of a chunk ``start:stop`` of ``S`` make the target rows whose source lies in it (in any resize direction).

    Args:
        grid, target: (h, w) of the map and of the grid it is resized to.
    """

    def __init__(self, grid: tuple[int, int], target: tuple[int, int], device: torch.device | None = None) -> None:
        self.grid, self.target = tuple(grid), tuple(target)
        self.identity = self.grid == self.target
        if not self.identity:
            self.source = nearest_rows(grid, target, device)  # [Ht*Wt]
            self.order = torch.argsort(self.source, stable=True)  # target rows by source row
            self.sorted = self.source[self.order]

    def rows(self, s_brk: torch.Tensor, rows: slice, mass_preserving: bool) -> tuple[torch.Tensor | slice, torch.Tensor]:
        """The target rows ``t`` (index or slice) that the chunk ``s_brk`` ``[B, r, h*w]`` (query rows ``rows``
        of ``S``) makes, and those rows of ``U(S)``: ``[B, len(t), Ht*Wt]``."""
        if self.identity:
            return rows, s_brk
        bounds = torch.tensor([rows.start, rows.stop], device=self.sorted.device)
        lo, hi = (int(i) for i in torch.searchsorted(self.sorted, bounds))
        t = self.order[lo:hi]
        return t, resize_keys(s_brk[:, self.source[t] - rows.start], self.grid, self.target, mass_preserving)


def mean_self_map(
    acts: Mapping[str, torch.Tensor], names: Sequence[str], grid: tuple[int, int], size: tuple[int, int], mass_preserving: bool
) -> torch.Tensor:
    """Mean of the self maps at ``names``, each resized to ``size`` (:func:`resize_self_map`): ``[B, HW, HW]``.
    Accumulated map by map, so at most one resized map exists besides the running sum."""
    total = None
    for name in names:
        m = resize_self_map(acts[name].float(), grid_of(acts[name].shape[1], grid), size, mass_preserving)
        total = m.clone() if total is None else total.add_(m)
    return total / len(names)


def propagate(x_bnhw: torch.Tensor, s_bqk: torch.Tensor, order: int) -> torch.Tensor:
    """Self-attention propagation ``X <- S^k X`` over pixels, then min-max.

    Args:
        x_bnhw: maps ``[B, N, H, W]``.
        s_bqk: row-stochastic self-attention ``[B, HW, HW]`` at the maps' resolution.
        order: k (0 = unchanged).
    """
    if order <= 0:
        return x_bnhw
    b, n, h, w = x_bnhw.shape
    flat = x_bnhw.flatten(2).transpose(1, 2)  # [B, HW, N]
    for _ in range(order):
        flat = torch.bmm(s_bqk.to(flat.dtype), flat)
    return minmax(flat.transpose(1, 2).reshape(b, n, h, w))


class SelfMapStream:
    """The self-map reductions of one GOCA observation (see the module docstring).

    Args:
        weight_factors: ``{self map name: f}`` for the layer-weight maps, ``f`` the map grid's linear size
            over the reference grid's (a power of two; ``f > 1``: kept resized to the reference grid, else
            kept as it is).
        refine_names: self maps summed for refinement (all on one grid).
        mass_preserving: the ``self_map_resize`` setting (``"mass-preserving"``).
        input_grid: the denoiser's input token grid (h, w) (level grids are ``ceil(h / s)``).
    """

    def __init__(
        self,
        weight_factors: Mapping[str, int],
        refine_names: Sequence[str],
        mass_preserving: bool,
        input_grid: tuple[int, int],
    ) -> None:
        self.weight_factors = dict(weight_factors)
        self.refine_names = list(refine_names)
        self.mass_preserving = mass_preserving
        self.input_grid = tuple(input_grid)
        self.refine_sum: torch.Tensor | None = None  # [B, HW, HW]
        self.targets: dict[str, tuple[int, int]] = {}  # name: the reference grid it was reduced to
        self.kept: dict[str, torch.Tensor] = {}  # name: U(S) [B, Ht*Wt, Ht*Wt]
        self._rows: dict[str, torch.Tensor] = {}  # name: source query row of each target row (non-decreasing)
        self._setup = threading.Lock()  # chunks of rows may be reduced on several threads at once

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.weight_factors, *self.refine_names]))

    def reducers(self) -> dict[str, Any]:
        """``{self map name: map reducer}`` for :class:`~difffeat.capture.Capture`'s ``map_reducers``."""
        return {name: self._reducer(name) for name in self.names()}

    def _reducer(self, name: str):
        refine = name in self.refine_names
        factor = self.weight_factors.get(name)

        def reduce(probs_bhqk: torch.Tensor, *, tensors: Any, rows: slice, **_: Any) -> torch.Tensor:
            mean = probs_bhqk.mean(dim=1)  # [B, q, HW] head mean, as difffeat.capture.head_mean
            b, q, n = mean.shape
            if refine:
                if self.refine_sum is None:
                    with self._setup:
                        if self.refine_sum is None:
                            self.refine_sum = mean.new_zeros((b, tensors.q.shape[2], n))
                self.refine_sum[:, rows] += mean  # rows of this chunk only
            if factor is None:
                return mean[..., :0]  # a refinement-only block keeps nothing of its own
            if factor <= 1:
                return mean
            (h, w) = grid = grid_of(n, self.input_grid)
            th, tw = target = (math.ceil(h / factor), math.ceil(w / factor))
            if name not in self.kept:
                with self._setup:
                    if name not in self.kept:
                        self.targets[name] = target
                        self._rows[name] = nearest_rows(grid, target, mean.device)
                        self.kept[name] = mean.new_empty((b, th * tw, th * tw))
            source = self._rows[name]  # row-major nearest indices never decrease
            lo, hi = (int(i) for i in torch.searchsorted(source, torch.tensor([rows.start, rows.stop], device=source.device)))
            if hi > lo:  # resize_self_map's rows lo:hi, from the chunk's own rows (its first form)
                self.kept[name][:, lo:hi] = resize_keys(mean[:, source[lo:hi] - rows.start], grid, target,
                                                        self.mass_preserving)
            return mean[..., :0]  # kept in self.kept

        reduce.thread_safe = True  # writes only its chunk's rows; shared buffers are made under a lock
        return reduce

    def finish(self, acts: dict[str, torch.Tensor], reference_grid: tuple[int, int] | None) -> torch.Tensor | None:
        """After the forward: put the reduced maps into ``acts`` (in place), drop the refinement-only entries;
        returns the refinement mean ``[B, HW, HW]`` (None without refinement).

        Raises:
            RuntimeError: a map was resized to a grid other than the reference feature's ``reference_grid``.
        """
        for name, target in self.targets.items():
            if reference_grid is None or tuple(target) != tuple(reference_grid):
                raise RuntimeError(f"{name} was reduced to the grid {target}, the reference feature is {reference_grid}")
            acts[name] = self.kept[name]
        for name in self.refine_names:
            if name not in self.weight_factors:
                acts.pop(name, None)
        if self.refine_sum is None:
            return None
        return self.refine_sum.div_(len(self.refine_names))
