"""Feature presets: named activation selections stored as YAML in ``configs/features/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import yaml

from .errors import ConfigError, close_matches
from .resources import data_dir

__all__ = ["presets_for", "recommended_preset"]


@dataclass(frozen=True)
class FeaturePreset:
    """A named selection of activations for one model family.

    Attributes:
        name: preset id (file stem), e.g. ``sd15-practical``.
        family: backbone family it is meant for (``sd``, ``sdxl``, ``pixart``, ``sd3``, ``flux``).
        features: activation names (canonical or the paper's aliases).
        t: recommended timestep; resolution: recommended input resolution (long side, px).
        validated: False for selections without published measurements (our starting points).
    """

    name: str
    family: str
    features: tuple[str, ...]
    t: int
    resolution: int | None
    validated: bool
    description: str = ""
    source: str = ""
    models: tuple[str, ...] = field(default_factory=tuple)

    def missing_in(self, catalog) -> list[str]:
        """This preset's activations that ``catalog`` (a model's :class:`~difffeat.catalog.Catalog`) lacks."""
        return [f for f in self.features if f not in catalog]


def list_presets() -> list[str]:
    return sorted(p.stem for p in (data_dir("configs") / "features").glob("*.yaml"))


def load_preset(name: str) -> FeaturePreset:
    """Load ``configs/features/<name>.yaml``, or a preset file (a path ending in .yaml / .yml, e.g. one
    ``difffeat probe --rank --save-preset`` wrote); unknown names list the close matches."""
    if str(name).endswith((".yaml", ".yml")):
        from pathlib import Path

        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"preset file not found: {str(name)!r}")
        return _parse_preset(path.stem, path)
    return _load_named_preset(name)


@lru_cache(maxsize=None)
def _load_named_preset(name: str) -> FeaturePreset:
    path = data_dir("configs") / "features" / f"{name}.yaml"
    if not path.is_file():
        known = list_presets()
        hint = close_matches(name, known)
        raise ConfigError(
            f"unknown feature preset {name!r}"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
            + f" Available presets: {', '.join(known)}"
        )
    return _parse_preset(name, path)


def _parse_preset(name: str, path) -> FeaturePreset:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed preset file {path}: {exc}") from None
    try:
        return FeaturePreset(
            name=name,
            family=raw["family"],
            features=tuple(raw["features"]),
            t=int(raw.get("t", 50)),
            resolution=raw.get("resolution"),
            validated=bool(raw.get("validated", False)),
            description=str(raw.get("description", "")).strip(),
            source=str(raw.get("source", "")).strip(),
            models=tuple(raw.get("models", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed preset file {path}: {exc}") from None


def presets_for(backbone) -> list[str]:
    """Names of the presets that fit ``backbone``: its family, and every activation present in its catalog."""
    from .capture import catalog_of

    cat = catalog_of(backbone)
    return [
        name for name in list_presets()
        if (p := load_preset(name)).family == backbone.family and not p.missing_in(cat)
    ]  # fmt: skip


def preset_rows() -> list[list[str]]:
    """``[name, family, t, resolution, validated, features (one per line)]`` for every preset (``difffeat presets``)."""
    rows = []
    for name in list_presets():
        p = load_preset(name)
        rows.append([name, p.family, str(p.t), str(p.resolution), "yes" if p.validated else "NO", "\n".join(p.features)])
    return rows


def recommended_preset(backbone) -> str | None:
    """The preset to start from on ``backbone``: among :func:`presets_for`, one made for this model
    (``models`` names it) before one for its family, a ``*-practical`` one before the others; None if none fits."""
    fits = presets_for(backbone)
    name = str(getattr(backbone, "name", ""))
    return min(fits, key=lambda p: (name not in load_preset(p).models, not p.endswith("-practical")), default=None)
