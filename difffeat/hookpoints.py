"""Hook-point tables (``hooks/*.yaml``) as typed rules: which activations exist at which module paths."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections.abc import Iterable
from functools import lru_cache

import yaml

from .errors import ConfigError, InvalidOptionError
from .resources import data_dir

__all__ = ["ActivationRule", "HookPoint", "HookTable", "load_table", "TOKEN_KINDS", "known_kinds", "check_kinds"]

#: what a rule's sequence activation holds: "image" (image tokens only, or a downsampled level's) or "joint"
#: (a joint sequence of image and text tokens, read through the forward's TokenLayout)
TOKEN_KINDS = ("image", "joint")
#: table keys that moved to the adapters' TokenLayout
_LAYOUT_KEYS = ("token_order", "sequence_multiple")


@dataclass(frozen=True)
class ActivationRule:
    """One capturable activation at a matched module (see ``hooks/README.md`` for the fields)."""

    suffix: str
    kind: str
    target: str = ""
    index: int | None = None
    tokens: str = "image"
    observe: str | None = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class HookPoint:
    match: re.Pattern
    activations: tuple[ActivationRule, ...]


@dataclass(frozen=True)
class HookTable:
    family: str
    points: tuple[HookPoint, ...]
    root: tuple[ActivationRule, ...]
    aliases: tuple[tuple[re.Pattern, str], ...]
    stage_rule: str = "none"
    default_flags: tuple[str, ...] = field(default_factory=tuple)
    #: GOCA suffixes within a block: {"cross": ..., "self": ..., "query": ...}
    goca: dict = field(default_factory=dict)

    def rules_for(self, module_path: str) -> list[ActivationRule]:
        """Every activation rule whose pattern fully matches ``module_path``."""
        out: list[ActivationRule] = []
        for point in self.points:
            if point.match.fullmatch(module_path):
                out.extend(point.activations)
        return out

    def translate_alias(self, name: str) -> str | None:
        """The canonical name for a paper-style alias, or None."""
        for pattern, template in self.aliases:
            if pattern.fullmatch(name):
                return pattern.sub(template, name)
        return None


def _rule(raw: dict) -> ActivationRule:
    unknown = set(raw) - {"suffix", "kind", "target", "index", "tokens", "observe", "flags"}
    if unknown or "kind" not in raw:
        raise ConfigError(f"bad activation rule {raw!r} (unknown fields {sorted(unknown)} or no kind)")
    if raw.get("tokens", "image") not in TOKEN_KINDS:
        raise ConfigError(
            f"bad tokens {raw['tokens']!r} in activation rule {raw!r}: use image or joint (where the image tokens "
            "of a joint sequence sit is the adapter's TokenLayout)"
        )
    return ActivationRule(
        suffix=str(raw.get("suffix", "")),
        kind=raw["kind"],
        target=raw.get("target", "") or "",
        index=raw.get("index"),
        tokens=raw.get("tokens", "image"),
        observe=raw.get("observe"),
        flags=tuple(raw.get("flags", ())),
    )


@lru_cache(maxsize=None)
def load_table(name: str) -> HookTable:
    """Load ``hooks/<name>.yaml``."""
    path = data_dir("hooks") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no hook table {name!r} at {path}")
    raw = yaml.safe_load(path.read_text())
    moved = [k for k in _LAYOUT_KEYS if k in raw]
    if moved:
        raise ConfigError(
            f"{', '.join(moved)} in {path} is no longer read: the family's adapter declares its sequence layout "
            "(its token_layout: difffeat.backbones.layout.TokenLayout)"
        )
    try:
        points = tuple(
            HookPoint(re.compile(p["match"]), tuple(_rule(a) for a in p["activations"])) for p in raw["points"]
        )
        root = tuple(_rule(a) for a in raw.get("root", ()))
        aliases = tuple((re.compile(a["paper"]), a["name"]) for a in raw.get("aliases", ()))
    except (KeyError, TypeError, re.error) as exc:
        raise ConfigError(f"malformed hook table {path}: {exc}") from None
    return HookTable(
        family=raw["family"],
        points=points,
        root=root,
        aliases=aliases,
        stage_rule=raw.get("stage_rule", "none"),
        default_flags=tuple(raw.get("default_flags", ())),
        goca=dict(raw.get("goca", {})),
    )


@lru_cache(maxsize=None)
def known_kinds() -> frozenset[str]:
    """Every activation kind some hook table (``hooks/*.yaml``) defines: what ``--kind`` may name."""
    kinds: set[str] = set()
    for path in sorted(data_dir("hooks").glob("*.yaml")):
        table = load_table(path.stem)
        kinds.update(rule.kind for point in table.points for rule in point.activations)
        kinds.update(rule.kind for rule in table.root)
    return frozenset(kinds)


def check_kinds(kinds: str | Iterable[str] | None, available: Iterable[str] | None = None) -> list[str]:
    """``kinds`` (a list or a comma-separated string) as a list, each a kind of some hook table and, when
    ``available`` is given (a model's kinds), one of those.

    Raises:
        InvalidOptionError: a kind no family has (naming the valid kinds), or one the model lacks (naming its kinds).
    """
    if kinds is None:
        return []
    wanted = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else [str(k).strip() for k in kinds]
    wanted = [k for k in wanted if k]
    unknown = [k for k in wanted if k not in known_kinds()]
    if unknown:
        raise InvalidOptionError(f"unknown activation kind {unknown[0]!r}; valid kinds: {', '.join(sorted(known_kinds()))}")
    if available is not None:
        have = set(available)
        absent = [k for k in wanted if k not in have]
        if absent:
            raise InvalidOptionError(f"this model has no {absent[0]!r} activations; its kinds: {', '.join(sorted(have))}")
    return wanted
