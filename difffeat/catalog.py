"""The catalog: every capturable activation of a loaded backbone, with stable name, kind, shape and the
property flags of the generic-diffusion-feature paper.

Names come from the diffusers module tree matched against the family's hook table (``hooks/<family>.yaml``),
so any checkpoint of a supported family is covered without a hand-written list. Shapes are filled in by
:func:`difffeat.capture.catalog_of` (one fake-tensor forward through :class:`~difffeat.capture.Capture`), the
layer above, so this module needs no hooks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .errors import UnknownActivationError
from .hookpoints import ActivationRule, HookTable, check_kinds, load_table

if TYPE_CHECKING:
    from .backbones.base import Backbone

__all__ = ["build_catalog", "NOISY_FLAGS"]

#: ``observe`` values that are attention probabilities; ``q``/``k``/``v`` are the image tokens' queries, keys
#: and values as attended (after q/k norms and RoPE), observed at the same call
MAP_OBSERVATIONS = frozenset({"self", "cross", "all"})

#: flags that mark an activation as noisy (dropped by :meth:`Catalog.candidates`)
NOISY_FLAGS = frozenset({"noisy-kind", "down-stage-noise", "up-late-noise", "late-block"})


@dataclass(frozen=True)
class ActivationInfo:
    """One capturable activation.

    Attributes:
        name: stable name (module path + optional suffix), e.g. ``up_blocks.1.attentions.1.transformer_blocks.0.attn2.q``.
        kind: what it is: ``resnet-out``, ``resnet-increment``, ``vit-out``, ``block-out``, ``self-q``, ``self-k``,
            ``self-v``, ``cross-q``, ``self-out``, ``cross-out``, ``ff-inner``, ``ff-out``, ``self-map``, ``cross-map``,
            ``upsampler-out``, ``downsampler-out``, ``level-out``, ``joint-q``..., ``input``, ``output``.
        module: path of the module the rule matched ("" = the denoiser itself).
        hook_module: path of the module whose forward is hooked (module + rule target).
        shape: per-image shape at the catalog's probe resolution: ``(C, H, W)`` for features, ``(heads, HW, K)``
            for attention maps (K = text tokens for cross maps, HW for self maps).
        flags: property flags (see ``hooks/README.md``).
    """

    name: str
    kind: str
    module: str
    hook_module: str
    index: int | None = None
    tokens: str = "image"
    observe: str | None = None
    flags: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None

    @property
    def is_map(self) -> bool:
        return self.observe in MAP_OBSERVATIONS

    @property
    def channels(self) -> int | None:
        return None if self.shape is None or self.is_map else self.shape[0]

    @property
    def resolution(self) -> tuple[int, int] | None:
        """(H, W) of the feature map, or of the query grid for attention maps."""
        if self.shape is None:
            return None
        if self.is_map:
            return None
        return self.shape[1], self.shape[2]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        d["flags"] = list(self.flags)
        d["channels"] = self.channels
        d["resolution"] = list(self.resolution) if self.resolution else None
        return d


@dataclass
class Catalog:
    """All activations of one backbone; look up by name or paper alias, filter by kind/flags/resolution."""

    family: str
    table: HookTable
    activations: list[ActivationInfo]
    probe_size: tuple[int, int] | None = None
    _by_name: dict[str, ActivationInfo] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {a.name: a for a in self.activations}

    def __len__(self) -> int:
        return len(self.activations)

    def __iter__(self) -> Iterator[ActivationInfo]:
        return iter(self.activations)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical(name) in self._by_name

    def names(self) -> list[str]:
        return [a.name for a in self.activations]

    def canonical(self, name: str) -> str:
        """Canonical form of a name or paper alias (unchanged when it is unknown)."""
        if name in self._by_name:
            return name
        translated = self.table.translate_alias(name)
        return translated if translated is not None else name

    def __getitem__(self, name: str) -> ActivationInfo:
        canonical = self.canonical(name)
        try:
            return self._by_name[canonical]
        except KeyError:
            hint = ""
            if canonical != name:
                hint = f"(the paper-style name {name!r} means {canonical!r}, which this model does not have)"
            raise UnknownActivationError(name, self._by_name, hint) from None

    def resolve(self, names: Iterable[str]) -> list[ActivationInfo]:
        """Look up several names; error for an empty list, unknown names or duplicates."""
        names = list(names)
        if not names:
            raise ValueError("empty feature list: name at least one activation (see `difffeat catalog MODEL`)")
        out, seen = [], set()
        for n in names:
            info = self[n]
            if info.name not in seen:
                seen.add(info.name)
                out.append(info)
        return out

    def filter(
        self,
        kind: str | Iterable[str] | None = None,
        flags: Iterable[str] = (),
        exclude_flags: Iterable[str] = (),
        resolution: tuple[int, int] | None = None,
        maps: bool | None = None,
    ) -> list[ActivationInfo]:
        """Activations matching every given criterion."""
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind is not None else None
        need, avoid = set(flags), set(exclude_flags)
        return [
            a
            for a in self.activations
            if (kinds is None or a.kind in kinds)
            and need <= set(a.flags)
            and not (avoid & set(a.flags))
            and (resolution is None or a.resolution == tuple(resolution))
            and (maps is None or a.is_map == maps)
        ]

    def candidates(self) -> list[ActivationInfo]:
        """Feature candidates after the paper's filtering: no noisy kinds or stages, no over-refined late
        blocks, no attention maps, no model input/output."""
        return [
            a
            for a in self.filter(exclude_flags=NOISY_FLAGS, maps=False)
            if a.kind not in {"input", "output", "conv-in", "patch-embed", "level-out"}
        ]

    def select(self, kinds: str | Iterable[str] | None = None, candidates: bool = False) -> list[ActivationInfo]:
        """What ``difffeat catalog`` lists: the candidates or everything, restricted to ``kinds`` (a list or a
        comma-separated string) when given.

        Raises:
            InvalidOptionError: a kind that no family has, or that this model lacks (the message lists the valid ones).
        """
        items = self.candidates() if candidates else list(self.activations)
        wanted = set(check_kinds(kinds, {a.kind for a in self.activations}))
        return [a for a in items if a.kind in wanted] if wanted else items

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps([a.to_dict() for a in self.activations], indent=indent)


# --------------------------------------------------------------------------- flags by position
def _unet_stage_flags(path: str, denoiser: torch.nn.Module) -> tuple[str, ...]:
    """Position flags for UNets.

    The down stage carries diffusion noise (``down-stage-noise``). Along the up path (resnet/ViT repeats in
    forward order) noise returns late: the last quarter is ``up-late-noise``, the rest ``up-early``. (The
    paper says "second half"; a literal half would flag its own recommended SD1.5 ``up-level2`` and SDXL
    ``up-level1`` picks, so the threshold is calibrated on those selections.) Transformer blocks late in a
    deep ViT (k >= 0.8 n, n > 2) are ``late-block`` (over-refined)."""
    flags: list[str] = []
    parts = path.split(".")
    if parts[0] in ("down_blocks", "conv_in"):
        flags.append("down-stage-noise")
    elif parts[0] == "mid_block":
        flags.append("mid-stage")
    elif parts[0] == "up_blocks" and len(parts) >= 2:
        up = denoiser.up_blocks
        repeats = [len(b.resnets) for b in up]
        i = int(parts[1])
        j = int(parts[3]) if len(parts) >= 4 and parts[2] in ("resnets", "attentions") else repeats[i] - 1
        position = sum(repeats[:i]) + j
        flags.append("up-early" if position < 0.75 * sum(repeats) else "up-late-noise")
    if "transformer_blocks" in parts:
        k = int(parts[parts.index("transformer_blocks") + 1])
        parent = denoiser.get_submodule(".".join(parts[: parts.index("transformer_blocks")]))
        n = len(parent.transformer_blocks)
        if n > 2 and k >= math.ceil(0.8 * n):
            flags.append("late-block")
    return tuple(flags)


_STAGE_RULES = {"unet": _unet_stage_flags, "none": lambda path, denoiser: ()}


# --------------------------------------------------------------------------- building
def _info(path: str, rule: ActivationRule, table: HookTable, denoiser: torch.nn.Module) -> ActivationInfo:
    name = f"{path}.{rule.suffix}" if path and rule.suffix else (path or rule.suffix)
    hook_module = ".".join(p for p in (path, rule.target) if p)
    flags = tuple(dict.fromkeys(rule.flags + table.default_flags + _STAGE_RULES[table.stage_rule](path, denoiser)))
    return ActivationInfo(
        name=name,
        kind=rule.kind,
        module=path,
        hook_module=hook_module,
        index=rule.index,
        tokens=rule.tokens,
        observe=rule.observe,
        flags=flags,
    )


_SEPARATE_PROJECTIONS = frozenset({"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"})


def _unused_projection(module: torch.nn.Module, target: str) -> bool:
    """After ``fuse_qkv_projections()`` diffusers keeps ``to_q``/``to_k``/``to_v`` but runs ``to_qkv``: hooks on
    the separate projections would never fire (their attended q/k/v are still observed at the SDPA call)."""
    return target in _SEPARATE_PROJECTIONS and bool(getattr(module, "fused_projections", False))


def enumerate_activations(denoiser: torch.nn.Module, table: HookTable) -> list[ActivationInfo]:
    """Every activation the table defines on this module tree, in forward (module registration) order."""
    infos = [_info("", r, table, denoiser) for r in table.root if r.suffix == "input"]
    modules = dict(denoiser.named_modules())
    for path in modules:
        if not path:
            continue
        for rule in table.rules_for(path):
            if rule.target and (f"{path}.{rule.target}" not in modules or _unused_projection(modules[path], rule.target)):
                continue  # e.g. an attention without to_q, or whose to_q is bypassed by fused projections
            infos.append(_info(path, rule, table, denoiser))
    infos += [_info("", r, table, denoiser) for r in table.root if r.suffix == "output"]
    return infos


def build_catalog(
    backbone: "Backbone", shape_of: dict[str, tuple[int, ...]] | None = None, probe_size: tuple[int, int] | None = None
) -> Catalog:
    """The catalog of a backbone's activations from its hook table and module tree.

    ``shape_of`` (per-image shapes at pixel ``probe_size``, in forward order, e.g. from
    :func:`difffeat.capture.probe_shapes`) fills the shapes and orders the activations by execution."""
    table = load_table(backbone.hook_table)
    infos = enumerate_activations(backbone.denoiser, table)
    if shape_of is not None:
        # forward (execution) order reads better than registration order (UNets register mid after up)
        rank = {name: i for i, name in enumerate(shape_of)}
        infos = sorted(
            (replace(a, shape=shape_of.get(a.name)) for a in infos), key=lambda a: rank.get(a.name, len(rank))
        )
    return Catalog(backbone.family, table, infos, probe_size)
