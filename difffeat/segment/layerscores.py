"""GOCA's layer scores formed during the forward: the second pass of the two-pass observation.

The layer score ``s_m = <P, U(S_m)>`` (:func:`~difffeat.segment.aggregation.layer_weights`) needs the pseudo
self-attention ``P`` of the reference feature. A UNet's reference block (SDXL: ``up_blocks.1``) runs after
most blocks, so one observed forward keeps every earlier block's self map until ``P`` exists (SDXL at
2048 px: 13.9 GiB). The two-pass observation (``SegmentSettings.memory``) first runs the forward up to the
reference feature and stops there (:class:`~difffeat.capture.Capture`'s early exit); the observed forward
then adds each chunk of query rows' share of every ``s_m`` as the chunk goes by
(:class:`LayerScoreStream`), so no self map outlives its chunk:

* a map on ``P``'s grid or finer: the chunk's rows of ``U(S_m)`` (:class:`~difffeat.segment.selfmaps.TargetRows`)
  times the same rows of ``P``, formed from the reference tokens
  (:func:`~difffeat.segment.aggregation.pseudo_attention`), so ``P`` itself is never held whole;
* a coarser map: ``<U^T P, S_m>`` with ``U^T P`` at the map's grid, built once per grid from ``P``'s rows
  (:func:`~difffeat.segment.selfmaps.resize_keys_adjoint`).

The refinement maps are summed into one ``[B, HW, HW]`` buffer at the largest map grid (resized to it when
they are on another). What the second pass keeps: one ``[HW, T]`` cross map per layer, the refinement sum,
the reference tokens and one ``U^T P`` per coarser grid; the scores equal the one-pass ones to float
rounding (the same products, summed chunk by chunk).

The reducers are thread-safe (the observer's chunk workers call them for disjoint chunks of rows at once,
:mod:`~difffeat.capture.chunk_workers`): a chunk's refinement rows are its own rows of the sum, and its float64
share of a score is added under a lock in row order (:class:`_RowOrderSum`), so the scores are bit-equal to
those of the chunks reduced one at a time in row order, whichever worker finishes first.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from .aggregation import pseudo_attention, reference_tokens
from .selfmaps import TargetRows, resize_keys_adjoint

__all__ = ["LayerScoreStream"]

#: elements of one block of ``P``'s rows formed at a time while building ``U^T P``
_P_BLOCK_ELEMENTS = 2**22


class _RowOrderSum:
    """A float64 running sum ``[B]`` of per-chunk parts, added in the order of the chunks' rows whichever thread
    hands its part in first: a part waits (``[B]`` floats) until every earlier row's part is in. The chunks of
    one observation cover ``range(n_rows)``; a further observation starts at row 0 again."""

    def __init__(self, b: int, n_rows: int, device: torch.device) -> None:
        self.total = torch.zeros(b, dtype=torch.float64, device=device)
        self.n_rows = n_rows
        self._next = 0  # the first row whose part is not yet added
        self._waiting: dict[int, tuple[int, torch.Tensor]] = {}  # start: (stop, part)

    def add(self, rows: slice, part: torch.Tensor) -> None:
        """Call under the owner's lock."""
        self._waiting[rows.start] = (rows.stop, part)
        while self._next in self._waiting:
            stop, part = self._waiting.pop(self._next)
            self.total += part
            self._next = 0 if stop >= self.n_rows else stop


class LayerScoreStream:
    """Map reducers that score each layer-weight self map against ``P`` and sum the refinement maps, chunk by
    chunk, keeping nothing of the maps themselves (see the module docstring).

    Args:
        ref_bchw: the reference feature ``[B, C, H, W]`` on ``P``'s grid (already upsampled for
            ``pseudo_grid="map"``).
        weight_grids: ``{self map name: (h, w)}`` of the layer-weight maps, in layer order.
        refine_grids: ``{self map name: (h, w)}`` of the refinement maps (empty: no refinement).
        refine_grid: the grid the refinement mean is formed on (the largest map grid).
        first_channel: ``ref_channels="first"``.
        mass_preserving: ``self_map_resize="mass-preserving"``.
    """

    def __init__(
        self,
        ref_bchw: torch.Tensor,
        weight_grids: Mapping[str, tuple[int, int]],
        refine_grids: Mapping[str, tuple[int, int]],
        refine_grid: tuple[int, int],
        first_channel: bool,
        mass_preserving: bool,
    ) -> None:
        self.p_grid = tuple(ref_bchw.shape[-2:])
        self.f = reference_tokens(ref_bchw, first_channel)  # [B, HW_P, C]
        self.weight_grids = {k: tuple(v) for k, v in weight_grids.items()}
        self.refine_grids = {k: tuple(v) for k, v in refine_grids.items()}
        self.refine_grid = tuple(refine_grid)
        self.mass_preserving = mass_preserving
        b = self.f.shape[0]
        self.scores = {name: _RowOrderSum(b, g[0] * g[1], self.f.device) for name, g in self.weight_grids.items()}
        self.rows_seen = dict.fromkeys([*self.weight_grids, *self.refine_grids], 0)
        self.refine_sum: torch.Tensor | None = None  # [B, HW, HW] at refine_grid
        self._targets: dict[tuple[tuple[int, int], tuple[int, int]], TargetRows] = {}
        self._adjoints: dict[tuple[int, int], torch.Tensor] = {}  # grid: U^T P [B, hw, hw]
        self._setup = threading.Lock()  # made once: the refinement sum, TargetRows, U^T P
        self._add = threading.Lock()  # the row-ordered score sums and the row counts

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.weight_grids, *self.refine_grids]))

    def reducers(self) -> dict[str, Any]:
        """``{self map name: map reducer}`` for :class:`~difffeat.capture.Capture`'s ``map_reducers``."""
        return {name: self._reducer(name) for name in self.names()}

    def kept_bytes(self) -> int:
        """Bytes this stream holds (reference tokens, ``U^T P`` per coarser grid, the refinement sum)."""
        held = [self.f, *self._adjoints.values()] + ([self.refine_sum] if self.refine_sum is not None else [])
        return sum(x.numel() * x.element_size() for x in held)

    # ------------------------------------------------------------------ the pieces
    def _target_rows(self, grid: tuple[int, int], target: tuple[int, int]) -> TargetRows:
        key = (grid, target)
        if key not in self._targets:
            with self._setup:
                if key not in self._targets:
                    self._targets[key] = TargetRows(grid, target, self.f.device)
        return self._targets[key]

    def _p_rows(self, t: torch.Tensor | slice) -> torch.Tensor:
        """Rows ``t`` of ``P``: ``[B, len(t), HW_P]``."""
        return pseudo_attention(self.f[:, t], self.f)

    def _adjoint(self, grid: tuple[int, int]) -> torch.Tensor:
        """``U^T P`` at ``grid`` (coarser than ``P``'s), from blocks of ``P``'s rows: ``U^T P = c N_q^T P B_k``,
        so each block's key-adjoint rows are added to the rows of their nearest source pixel."""
        if grid not in self._adjoints:
            with self._setup:
                if grid not in self._adjoints:
                    self._adjoints[grid] = self._build_adjoint(grid)
        return self._adjoints[grid]

    def _build_adjoint(self, grid: tuple[int, int]) -> torch.Tensor:
        b, n_p, _ = self.f.shape
        source = TargetRows(grid, self.p_grid, self.f.device)
        g = self.f.new_zeros((b, grid[0] * grid[1], grid[0] * grid[1]))
        step = max(1, _P_BLOCK_ELEMENTS // max(1, b * n_p))
        for start in range(0, n_p, step):
            rows = slice(start, min(n_p, start + step))
            g.index_add_(1, source.source[rows], resize_keys_adjoint(self._p_rows(rows), grid, self.p_grid, self.mass_preserving))
        return g

    def _score(self, name: str, mean_bqk: torch.Tensor, rows: slice) -> None:
        grid = self.weight_grids[name]
        if grid[0] >= self.p_grid[0] and grid[1] >= self.p_grid[1]:  # on P's grid or finer: rows of U(S)
            t, u_rows = self._target_rows(grid, self.p_grid).rows(mean_bqk, rows, self.mass_preserving)
            part = (self._p_rows(t) * u_rows).sum(dim=(1, 2))
        else:  # coarser: <U^T P, S>
            part = (self._adjoint(grid)[:, rows] * mean_bqk).sum(dim=(1, 2))
        with self._add:
            self.scores[name].add(rows, part.double())

    def _refine(self, name: str, mean_bqk: torch.Tensor, rows: slice) -> None:
        if self.refine_sum is None:
            with self._setup:
                if self.refine_sum is None:
                    n = self.refine_grid[0] * self.refine_grid[1]
                    self.refine_sum = mean_bqk.new_zeros((mean_bqk.shape[0], n, n))
        t, u_rows = self._target_rows(self.refine_grids[name], self.refine_grid).rows(mean_bqk, rows, self.mass_preserving)
        self.refine_sum[:, t] += u_rows  # the target rows of this chunk's rows only: no other chunk writes them

    def _reducer(self, name: str):
        def reduce(probs_bhqk: torch.Tensor, *, rows: slice, **_: Any) -> torch.Tensor:
            mean = probs_bhqk.mean(dim=1)  # [B, q, HW] head mean, as difffeat.capture.head_mean
            grid = self.weight_grids.get(name) or self.refine_grids[name]
            if mean.shape[-1] != grid[0] * grid[1]:
                raise RuntimeError(f"{name} has {mean.shape[-1]} key pixels, its grid {grid} was expected")
            if name in self.refine_grids:
                self._refine(name, mean, rows)
            if name in self.weight_grids:
                self._score(name, mean, rows)
            with self._add:
                self.rows_seen[name] += rows.stop - rows.start
            return mean[..., :0]  # nothing kept

        reduce.thread_safe = True  # disjoint rows of the refinement sum; scores added in row order under a lock
        return reduce

    def finish(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After the forward: drop the (empty) self-map entries from ``acts`` (in place); returns the layer
        scores ``[B, M]`` (float32, in ``weight_grids``' order) and the refinement mean ``[B, HW, HW]`` (None
        without refinement).

        Raises:
            RuntimeError: a map was not observed over all its query rows.
        """
        for name, seen in self.rows_seen.items():
            grid = self.weight_grids.get(name) or self.refine_grids[name]
            if seen != grid[0] * grid[1]:
                raise RuntimeError(f"{name}: {seen} of its {grid[0] * grid[1]} query rows were observed")
            acts.pop(name, None)
        scores = torch.stack([self.scores[name].total for name in self.weight_grids], dim=1).float()
        mean = None if self.refine_sum is None else self.refine_sum.div_(len(self.refine_grids))
        return scores, mean

