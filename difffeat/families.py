"""The supported model families as one table, generated from the registry (adapters, hook tables, presets,
GOCA configs), so the README's table cannot drift from the code.

    print(difffeat.families.families_markdown())      # the README's "Model families" table
"""

from __future__ import annotations

from dataclasses import dataclass

from .backbones import FAMILIES
from .backbones.layout import TokenLayout
from .backbones.registry import pipelines_of
from .catalog import MAP_OBSERVATIONS
from .hookpoints import HookTable, load_table
from .presets import list_presets, load_preset
from .resources import data_dir

__all__ = ["FamilyRow", "family_rows", "families_markdown"]


@dataclass(frozen=True)
class FamilyRow:
    """One family: its diffusers pipelines, attention kind, maps, presets, GOCA config, and whether any
    preset of it reproduces published numbers."""

    family: str
    pipelines: tuple[str, ...]
    attention: str
    maps: str
    presets: tuple[str, ...]
    goca_config: str
    validated: bool


def _attention_kind(table: HookTable, layout: TokenLayout) -> str:
    """What the table's attention layers are: ``cross + self`` (separate modules) or ``joint`` (one module
    observed for both), with single-stream blocks, attended-only (fused) q/k/v, linear (non-softmax)
    self-attention and joint sequences packed per sample noted."""
    observed = [(p.match.pattern, {r.observe for r in p.activations if r.observe}) for p in table.points]
    joint = any({"cross", "self"} <= kinds for _, kinds in observed)
    kind = f"joint ({layout.order.replace('-', ' ')})" if joint else "cross + self"
    if any(pattern.startswith("single_") and kinds & MAP_OBSERVATIONS for pattern, kinds in observed):
        kind += ", single-stream"
    if any("v" in kinds and not any(r.target == "to_v" for p in table.points if p.match.pattern == pattern for r in p.activations)
           for pattern, kinds in observed):  # fmt: skip
        kind += ", fused qkv"
    rules = [r for p in table.points for r in p.activations]
    if any("linear-attention" in r.flags for r in rules):
        kind += ", linear self-attention"
    if layout.packed:
        kind += ", packed per sample"
    if layout.block_multiple > 1:
        kind += f", blocks padded to {layout.block_multiple} tokens"
    return kind


def family_rows() -> list[FamilyRow]:
    """One :class:`FamilyRow` per registered family, in registration order."""
    presets = [load_preset(n) for n in list_presets()]
    goca = data_dir("configs") / "goca"
    rows = []
    for family, adapter in FAMILIES.items():
        table = load_table(adapter.hook_table)
        kinds = sorted({r.observe for p in table.points for r in p.activations if r.observe in MAP_OBSERVATIONS})
        mine = [p for p in presets if p.family == family]
        rows.append(
            FamilyRow(
                family=family,
                pipelines=tuple(pipelines_of(family)),
                attention=_attention_kind(table, adapter.token_layout),
                maps=", ".join(kinds) or "none",
                presets=tuple(p.name for p in mine),
                goca_config=f"configs/goca/{family}.yaml" if (goca / f"{family}.yaml").is_file() else "built-in defaults",
                validated=any(p.validated for p in mine),
            )
        )
    return rows


def families_markdown() -> str:
    """The families table in Markdown (what the README shows between its ``families`` markers)."""
    lines = [
        "| family | pipelines | attention | maps | presets | GOCA config | validated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in family_rows():
        lines.append(
            f"| {r.family} | {', '.join(r.pipelines)} | {r.attention} | {r.maps} | {', '.join(r.presets) or '-'} "
            f"| {r.goca_config} | {'yes' if r.validated else 'no'} |"
        )
    return "\n".join(lines) + "\n"
