"""Segmentation settings as data: per-model defaults live in ``configs/goca/<model or family>.yaml``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from ..checks import check_number, check_resolution
from ..errors import ConfigError
from ..resources import data_dir

# The string switches of SegmentSettings: each field is typed with one of these, and the allowed values that
# __post_init__ checks are read from the type.
Heads = Literal["mean", "goca"]
LayerWeights = Literal["uniform", "goca"]
Rescale = Literal["none", "goca"]
# Departures from the published code (Darkbblue/goca); the first value of each is the published behaviour.
SelfMapResize = Literal["plain", "mass-preserving"]
RefChannels = Literal["first", "all"]
PseudoGrid = Literal["reference", "map"]
EntityMerge = Literal["before-refine", "after-refine"]
#: the keys of :data:`difffeat.segment.postprocess.POSTPROCESS` / :data:`difffeat.segment.prompts.FILLERS`
Postprocess = Literal["none", "pamr", "crf"]
FillerWords = Literal["difffeat", "published"]
#: how an image reaches the model's input size: "keep" (difffeat: long side to the resolution, aspect ratio
#: kept) or "square" (the published GOCA pipeline: squashed to resolution x resolution)
Resize = Literal["keep", "square"]
#: which latents of the image the forward noises: "mean" (difffeat: the VAE posterior's mean, deterministic) or
#: "sample" (the published img2img pipelines' ``retrieve_latents``: a draw from the posterior, seeded here)
VaeLatents = Literal["mean", "sample"]
#: how the observation holds the self maps of the blocks that run before the reference feature (see
#: :mod:`difffeat.segment.memory`): "auto" (two passes when one would keep more than ``map_budget_mb``),
#: "one-pass" (kept until the reference feature exists) or "two-pass" (a forward up to the reference feature
#: first, then the layer scores formed during the observed forward; a partial extra forward)
Memory = Literal["auto", "one-pass", "two-pass"]

HEADS = get_args(Heads)
LAYERS = get_args(LayerWeights)
RESCALE = get_args(Rescale)
SELF_MAP_RESIZE = get_args(SelfMapResize)
REF_CHANNELS = get_args(RefChannels)
PSEUDO_GRID = get_args(PseudoGrid)
ENTITY_MERGE = get_args(EntityMerge)
RESIZE = get_args(Resize)
VAE_LATENTS = get_args(VaeLatents)
MEMORY = get_args(Memory)
#: the config every model gets unless another is named: ``configs/goca/<model or family>.yaml``
DEFAULT_CONFIG = "default"


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
        refine_blocks: blocks whose head-averaged self maps are averaged for refinement. The published
            configs list specific blocks per model (SD1.5: 3, SDXL: 7, PixArt: 8, FLUX: 2; the family files
            in ``configs/goca/`` carry them); empty = difffeat's variant, every block at the largest attention
            resolution. A family list the model lacks entirely (e.g. a tiny test model) falls back to it.
        refine_order: k of ``X <- S^k X`` (0 disables refinement).
        tau: background offset: background score = tau + supporting map.
        blur_kernel / blur_sigma: Gaussian blur of class maps.
        template: caption template; "{}" receives "class1, class2, ..., entity".
        background_entities: extra caption nouns whose maps form the supporting (background) map.
        resolution: input long side in px (None = the model's native resolution).
        seed: noise seed.
        self_map_resize: how a block's self-attention map ``[HW, HW]`` is resized to another grid (layer
            weights and refinement), bilinear over keys and nearest over queries either way.
            "plain" (published): the resized rows are not rescaled, so a map taken from a grid of h*w pixels
            to one of H*W carries a factor (H*W)/(h*w) in its layer score. "mass-preserving" (difffeat's
            variant): each row is multiplied by (h*w)/(H*W) so it keeps summing to 1.
        ref_channels: channels of the reference query used for the pseudo self-attention P.
            "first" (published): channel 0 only, ``P = softmax(f f^T)`` with scalar f (the reference code
            indexes the feature ``[C, h, w]`` once more; a bug, but it produced the paper's numbers).
            "all" (difffeat's variant): every channel, ``P = softmax(F F^T / sqrt(C))``.
        pseudo_grid: where P and the layer scores are computed. "reference" (published): at the reference
            block's own grid, every self map resized to it. "map" (difffeat's variant): the reference
            feature is first upsampled (bilinear) to the map grid (the largest attention grid).
        entity_merge: when several background entities' maps become the one supporting map.
            "before-refine" (published): max-merged after min-max, then propagated with the class maps.
            "after-refine" (difffeat's variant): each entity's map is propagated, then they are max-merged.
            Identical with a single entity.
        postprocess: refinement of the decision at image resolution: "none", "pamr" or "crf" (dense CRF,
            the ``difffeat[crf]`` extra); see :mod:`difffeat.segment.postprocess`. The published configs
            use none.
        resize: "keep" (the long side becomes ``resolution``, aspect ratio kept) or "square" (squashed to
            ``resolution`` x ``resolution``, as the published pipeline feeds every image); labels come back
            at the image's own size either way.
        vae_latents: "mean" (the VAE posterior's mean) or "sample" (a seeded draw from the posterior, as the
            published img2img pipelines encode; :meth:`Backbone.sample_latents`).
        filler_words: words of a class or entity phrase never counted as its tokens: "difffeat" (a, an,
            the, and, of, on, in, with, punctuation) or "published" (the GOCA code's list: no of/on/in/with; the default).
        memory: "auto", "one-pass" or "two-pass": how the self maps of the blocks before the reference
            feature are held (:mod:`difffeat.segment.memory`; the labels are the same either way). One pass
            keeps them until the reference feature exists (SDXL at 2048 px: 13.9 GiB of maps); two passes run
            the forward up to the reference feature first and then score each map as it is computed (SDXL at
            2048 px: 1.2 GiB), at the cost of that partial extra forward (~0.8 of a bare SDXL forward's
            FLOPs). "auto": two passes when one pass would keep more than ``map_budget_mb`` and two keep
            less. Only ``layers="goca"`` has such maps. Not part of run manifests (:data:`EXECUTION_ONLY`).
        map_budget_mb: the maps (MiB, fp32, the whole batch) one pass may keep before "auto" takes two.
    """

    t: int = 100
    heads: Heads = "goca"
    layers: LayerWeights = "goca"
    rescale: Rescale = "goca"
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
    self_map_resize: SelfMapResize = "plain"
    ref_channels: RefChannels = "first"
    pseudo_grid: PseudoGrid = "reference"
    entity_merge: EntityMerge = "before-refine"
    postprocess: Postprocess = "none"
    filler_words: FillerWords = "published"
    resize: Resize = "keep"
    vae_latents: VaeLatents = "mean"
    memory: Memory = "auto"
    map_budget_mb: float = 2048.0

    def __post_init__(self) -> None:
        for name, allowed in switches().items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        from .postprocess import check_postprocess

        check_postprocess(self.postprocess)  # crf: its package is installed
        if "{}" not in self.template:
            raise ConfigError(f"template {self.template!r} needs a '{{}}' placeholder for the class list")
        check_number("tau", self.tau, -1.0, 1.0)
        check_number("refine_order", self.refine_order, 0, 8, integer=True)
        check_resolution("resolution", self.resolution)
        check_number("map_budget_mb", self.map_budget_mb, 0.0, 2.0**30)

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

    def to_dict(self, results_only: bool = False) -> dict[str, Any]:
        """The settings as plain data (tuples as lists) with the method's short name; ``results_only``: without
        :data:`EXECUTION_ONLY` (how a segmentation runs, never what it gives), as run manifests compare them."""
        d = asdict(self)
        if results_only:
            for name in EXECUTION_ONLY:
                d.pop(name)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["method"] = self.method
        return d


#: settings that change how a segmentation runs (its memory and time), never its labels
EXECUTION_ONLY = ("memory", "map_budget_mb")


@cache
def switches() -> dict[str, tuple[str, ...]]:
    """The string switches of :class:`SegmentSettings` and their allowed values (read from the fields' ``Literal``
    types), in field order. Do not modify the returned dict."""
    hints = get_type_hints(SegmentSettings)
    return {f.name: get_args(hints[f.name]) for f in fields(SegmentSettings) if get_origin(hints[f.name]) is Literal}


def _config_folder(config: str):
    """The folder holding a named config's files: ``configs/goca`` itself for the default config,
    ``configs/goca/<config>/`` for the others (e.g. ``goca-reference``)."""
    folder = data_dir("configs") / "goca"
    return folder if config == DEFAULT_CONFIG else folder / config


def config_names() -> list[str]:
    """Every selectable config: ``default`` and each folder of ``configs/goca/`` (e.g. ``goca-reference``)."""
    folder = data_dir("configs") / "goca"
    return [DEFAULT_CONFIG] + sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def settings_for(model_name: str, family: str, config: str = DEFAULT_CONFIG) -> SegmentSettings:
    """Settings of a model under a named config.

    ``default``: ``configs/goca/<model>.yaml`` if it exists (e.g. ``shapes``), else the family's file, else
    the built-in defaults. Any other name (e.g. ``goca-reference``, the published configs of
    Darkbblue/goca): ``configs/goca/<config>/<family>.yaml``; a family the config has no file for is an error.

    Raises:
        ConfigError: unknown config name (the message lists the available ones), a family the config does not
            cover, or a file with unknown settings.
    """
    names = config_names()
    if config not in names:
        raise ConfigError(f"unknown segmentation config {config!r}; available: {', '.join(names)}")
    folder = _config_folder(config)
    keys = (model_name, family) if config == DEFAULT_CONFIG else (family,)
    for key in keys:
        path = folder / f"{key}.yaml"
        if key and path.is_file():
            return _load_settings(path)
    if config != DEFAULT_CONFIG:
        have = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(
            f"config {config!r} has no settings for the {family!r} family (it covers: {', '.join(have)}); "
            f"use config={DEFAULT_CONFIG!r} for this model"
        )
    return SegmentSettings()


def _load_settings(path) -> SegmentSettings:
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(SegmentSettings)}
    unknown = set(raw) - known - {"description", "source"}
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    return SegmentSettings().update(**{k: v for k, v in raw.items() if k in known})
