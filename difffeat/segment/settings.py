"""Segmentation settings as data: per-model defaults live in ``configs/goca/<model or family>.yaml``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import yaml

from ..errors import ConfigError
from ..resources import data_dir

__all__ = ["SegmentSettings", "settings_for", "HEADS", "LAYERS", "RESCALE"]

HEADS = ("mean", "goca")
LAYERS = ("uniform", "goca")
RESCALE = ("none", "goca")


@dataclass(frozen=True)
class SegmentSettings:
    """Everything that determines a segmentation.

    The three GOCA components are switches; all three off is the vanilla baseline (head mean, uniform layer
    average, no rescaling; blur + min-max only), and every single-component ablation is a setting.

    Attributes:
        t: timestep (1000-step scale); GOCA uses 100 (FLUX 150).
        heads: "goca" (per-pixel head weights from each head's share of the output) or "mean".
        layers: "goca" (weights from the reference feature's pseudo self-attention) or "uniform".
        rescale: "goca" (divide class scores by the pixel's attention to content tokens) or "none".
        ref_block: transformer block whose cross-attention query is the reference feature; "auto" picks a
            block at the largest attention resolution.
        map_layers: blocks whose cross maps are combined; empty = every block with cross-attention.
        refine_blocks: blocks whose head-averaged self maps are averaged for refinement; empty = those at
            the largest attention resolution.
        refine_order: k of ``X <- S^k X`` (0 disables refinement).
        tau: background offset: background score = tau + supporting map.
        blur_kernel / blur_sigma: Gaussian blur of class maps.
        template: caption template; "{}" receives "class1, class2, ..., entity".
        background_entities: extra caption nouns whose maps form the supporting (background) map.
        resolution: input long side in px (None = the model's native resolution).
        seed: noise seed.
        postprocess: refinement of the decision at image resolution: "none", "pamr" or "crf" (dense CRF,
            the ``difffeat[crf]`` extra); see :mod:`difffeat.segment.postprocess`. The published configs
            use none.
        filler_words: words of a class or entity phrase never counted as its tokens: "difffeat" (a, an,
            the, and, of, on, in, with, punctuation) or "published" (the GOCA code's list: no of/on/in/with).
    """

    t: int = 100
    heads: str = "goca"
    layers: str = "goca"
    rescale: str = "goca"
    ref_block: str = "auto"
    map_layers: tuple[str, ...] = ()
    refine_blocks: tuple[str, ...] = ()
    refine_order: int = 2
    tau: float = 0.0
    blur_kernel: int = 5
    blur_sigma: float = 1.1
    template: str = "a photo of {}"
    background_entities: tuple[str, ...] = ("background",)
    resolution: int | None = None
    seed: int = 0
    postprocess: str = "none"
    filler_words: str = "difffeat"

    def __post_init__(self) -> None:
        from .postprocess import check_postprocess

        from .prompts import FILLERS

        check_postprocess(self.postprocess)
        if self.filler_words not in FILLERS:
            raise ConfigError(f"filler_words={self.filler_words!r} is not one of {tuple(FILLERS)}")
        for name, allowed in (("heads", HEADS), ("layers", LAYERS), ("rescale", RESCALE)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if "{}" not in self.template:
            raise ConfigError(f"template {self.template!r} needs a '{{}}' placeholder for the class list")

    @property
    def method(self) -> str:
        """Short name: "goca" (all on), "vanilla" (all off), or the components that are on."""
        on = [n for n, v in (("heads", self.heads), ("layers", self.layers), ("rescale", self.rescale)) if v == "goca"]
        return "goca" if len(on) == 3 else "vanilla" if not on else "+".join(on)

    def with_method(self, method: str) -> "SegmentSettings":
        """``goca`` = all three components, ``vanilla`` = none."""
        if method == "goca":
            return replace(self, heads="goca", layers="goca", rescale="goca")
        if method == "vanilla":
            return replace(self, heads="mean", layers="uniform", rescale="none")
        raise ConfigError(f"unknown method {method!r}; use 'goca' or 'vanilla' (or set heads/layers/rescale)")

    def update(self, **changes: Any) -> "SegmentSettings":
        changes = {k: v for k, v in changes.items() if v is not None}
        for key in ("map_layers", "refine_blocks", "background_entities"):
            if key in changes:
                changes[key] = tuple(changes[key])
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["method"] = self.method
        return d


def settings_for(model_name: str, family: str) -> SegmentSettings:
    """Defaults for a model: ``configs/goca/<model>.yaml`` if it exists (e.g. ``shapes``), else the
    family's file, else the built-in defaults."""
    folder = data_dir("configs") / "goca"
    for key in (model_name, family):
        path = folder / f"{key}.yaml"
        if key and path.is_file():
            raw = yaml.safe_load(path.read_text()) or {}
            known = {f.name for f in fields(SegmentSettings)}
            unknown = set(raw) - known - {"description", "source"}
            if unknown:
                raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
            return SegmentSettings().update(**{k: v for k, v in raw.items() if k in known})
    return SegmentSettings()
