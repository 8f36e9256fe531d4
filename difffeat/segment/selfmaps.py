"""Self maps reduced during the forward: GOCA's decision never needs a block's whole ``[HW, HW]`` map.

The decision uses self-attention twice (method.md §3): the layer score ``<P, U(S_m)>`` with ``S_m`` resized
to the reference grid (``U`` = :func:`~difffeat.segment.aggregation.resize_self_map`), and the mean of the
refinement blocks' maps. :class:`SelfMapStream` gives one map reducer per self map that, chunk of query
rows by chunk, keeps only that:

* a layer-weight map finer than the reference grid is kept as ``U(S_m)`` at the reference grid: of each
  chunk only the query rows that nearest resizing picks, resized bilinearly over key pixels (the same
  operations as ``resize_self_map``, row by row, so the values are the same), written into a
  reference-grid buffer; a map on the reference grid or coarser is kept as it is (the adjoint form of
  ``layer_weights`` handles it);
* the refinement maps are summed into one ``[B, HW, HW]`` buffer; a refinement block that is not also a
  layer-weight block keeps nothing of its own.

So the maps one segmentation keeps are one ``[HW, T]`` cross map per layer, at most one reference-grid map
per layer, and one ``[HW, HW]`` refinement sum, instead of a ``[HW, HW]`` map per block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def nearest_rows(grid: tuple[int, int], target: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Index ``[Ht*Wt]`` of the source pixel that ``F.interpolate(mode="nearest")`` picks for each target pixel
    when resizing ``grid`` (h, w) to ``target`` (Ht, Wt) (exact: the indices are interpolated as floats < 2**24)."""
    h, w = grid
    idx = torch.arange(h * w, dtype=torch.float32, device=device).view(1, 1, h, w)
    return F.interpolate(idx, size=tuple(target), mode="nearest").flatten().long()


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

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.weight_factors, *self.refine_names]))

    def reducers(self) -> dict[str, Any]:
        """``{self map name: map reducer}`` for :class:`~difffeat.capture.Capture`'s ``map_reducers``."""
        return {name: self._reducer(name) for name in self.names()}

    def _grid(self, n: int) -> tuple[int, int]:
        from .segmenter import grid_of

        return grid_of(n, self.input_grid)

    def _reducer(self, name: str):
        refine = name in self.refine_names
        factor = self.weight_factors.get(name)

        def reduce(probs_bhqk: torch.Tensor, *, tensors: Any, rows: slice, **_: Any) -> torch.Tensor:
            mean = probs_bhqk.mean(dim=1)  # [B, q, HW] head mean, as difffeat.capture.head_mean
            b, q, n = mean.shape
            if refine:
                if self.refine_sum is None:
                    self.refine_sum = mean.new_zeros((b, tensors.q.shape[2], n))
                self.refine_sum[:, rows] += mean
            if factor is None:
                return mean[..., :0]  # a refinement-only block keeps nothing of its own
            if factor <= 1:
                return mean
            (h, w) = grid = self._grid(n)
            th, tw = target = (math.ceil(h / factor), math.ceil(w / factor))
            if name not in self.kept:
                self.targets[name] = target
                self._rows[name] = nearest_rows(grid, target, mean.device)
                self.kept[name] = mean.new_empty((b, th * tw, th * tw))
            source = self._rows[name]  # row-major nearest indices never decrease
            lo, hi = (int(i) for i in torch.searchsorted(source, torch.tensor([rows.start, rows.stop], device=source.device)))
            if hi > lo:
                picked = mean[:, source[lo:hi] - rows.start]  # [B, r, HW]
                keys = F.interpolate(picked.reshape(-1, 1, h, w), size=target, mode="bilinear", align_corners=False)
                if self.mass_preserving:
                    keys = keys * (h * w) / (th * tw)  # the same expression as resize_self_map
                self.kept[name][:, lo:hi] = keys.reshape(b, hi - lo, th * tw)
            return mean[..., :0]  # kept in self.kept

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
