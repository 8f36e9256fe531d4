"""How much of the attention maps one GOCA observation keeps, in one pass or in two: accounting from the map
grids alone (no forward), and the choice of ``SegmentSettings.memory="auto"``.

One pass (:mod:`difffeat.segment.selfmaps`) keeps a ``[HW, T]`` cross map per layer, each layer-weight self
map reduced to at most the reference grid (kept whole where it cannot be reduced), a refinement sum, and the
reference feature. Two passes (:mod:`difffeat.segment.layerscores`) keep the cross maps, the refinement sum,
the reference tokens of ``P`` and one ``U^T P`` per self-map grid coarser than ``P``'s. The figures are fp32
bytes per image; ``difffeat bench accounting`` reports the same numbers for real-size UNets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["MapGeometry", "maps_kept_mb", "choose_passes"]

Grid = tuple[int, int]
_MIB = 2**20


def _hw(grid: Grid) -> int:
    return grid[0] * grid[1]


@dataclass(frozen=True)
class MapGeometry:
    """The grids of one GOCA observation at the forward's input size: what the accounting needs.

    Attributes:
        cross: ``{cross-map name: (h, w)}`` of the combined layers.
        weight: ``{self-map name: (h, w)}`` of the layer-weight maps (empty with ``layers="uniform"``).
        refine: ``{self-map name: (h, w)}`` of the refinement maps (empty without refinement).
        reference: (h, w) of the reference feature.
        ref_channels: channels of the reference feature.
        text_tokens: text-key columns of a cross map.
    """

    cross: dict[str, Grid]
    weight: dict[str, Grid] = field(default_factory=dict)
    refine: dict[str, Grid] = field(default_factory=dict)
    reference: Grid = (1, 1)
    ref_channels: int = 1
    text_tokens: int = 77

    @property
    def largest(self) -> Grid:
        """The largest cross-map grid (where the global map and the refinement mean are formed)."""
        return max(self.cross.values(), key=_hw)


def _one_pass_elements(geo: MapGeometry, pseudo_grid: str) -> int:
    """What :meth:`Segmenter._self_map_stream <difffeat.segment.segmenter.Segmenter>` keeps (the same rules)."""
    ref_hw = _hw(geo.reference)
    factors: dict[str, int] = {}
    reducible = True
    for name, grid in geo.weight.items():
        ratio = _hw(grid) / ref_hw
        f = round(math.sqrt(ratio)) if ratio >= 1 else 1
        if ratio >= 1 and (f * f * ref_hw != _hw(grid) or f & (f - 1)):
            reducible = False
        factors[name] = f if pseudo_grid == "reference" else 1
    refine = list(geo.refine)
    if any(_hw(geo.refine[n]) != _hw(geo.largest) for n in refine):
        reducible = False  # refinement maps resized to the largest grid: kept whole
    if all(factors.get(n, 0) == 1 for n in refine):
        refine = []  # kept whole as layer-weight maps
    if not refine and all(f == 1 for f in factors.values()):
        reducible = False  # nothing to reduce
    total = sum(_hw(g) * geo.text_tokens for g in geo.cross.values()) + _hw(geo.reference) * geo.ref_channels
    if not reducible:
        whole = {**geo.weight, **geo.refine}
        return total + sum(_hw(g) ** 2 for g in whole.values())
    total += sum((ref_hw if factors[n] > 1 else _hw(g)) ** 2 for n, g in geo.weight.items())
    return total + (_hw(geo.largest) ** 2 if refine else 0)


def _two_pass_elements(geo: MapGeometry, pseudo_grid: str, first_channel: bool) -> int:
    """What :class:`~difffeat.segment.layerscores.LayerScoreStream` and the cross maps keep."""
    p_grid = geo.reference if pseudo_grid == "reference" else geo.largest
    total = sum(_hw(g) * geo.text_tokens for g in geo.cross.values())
    total += _hw(p_grid) * (1 if first_channel else geo.ref_channels)  # reference tokens
    coarser = {g for g in geo.weight.values() if g[0] < p_grid[0] or g[1] < p_grid[1]}
    total += sum(_hw(g) ** 2 for g in coarser)  # U^T P per coarser grid
    return total + (_hw(geo.largest) ** 2 if geo.refine else 0)


def maps_kept_mb(geo: MapGeometry, passes: str, pseudo_grid: str = "reference", first_channel: bool = True) -> float:
    """MiB of fp32 maps (and reference feature) one image's observation keeps with ``passes`` ("one-pass" or
    "two-pass") under the settings ``pseudo_grid`` and ``ref_channels == "first"`` (``first_channel``)."""
    if passes == "one-pass":
        return _one_pass_elements(geo, pseudo_grid) * 4 / _MIB
    if passes == "two-pass":
        return _two_pass_elements(geo, pseudo_grid, first_channel) * 4 / _MIB
    raise ValueError(f"passes must be 'one-pass' or 'two-pass', got {passes!r}")


def choose_passes(memory: str, geo: MapGeometry, batch: int, budget_mb: float, pseudo_grid: str, first_channel: bool) -> str:
    """The observation mode for ``memory`` (the setting): "one-pass" or "two-pass" as given; "auto": two
    passes when one would keep more than ``budget_mb`` of maps for the ``batch`` and two keep less."""
    if memory != "auto":
        return memory
    one = batch * maps_kept_mb(geo, "one-pass", pseudo_grid, first_channel)
    two = batch * maps_kept_mb(geo, "two-pass", pseudo_grid, first_channel)
    return "two-pass" if one > budget_mb and two < one else "one-pass"
