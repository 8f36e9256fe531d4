"""``Segmenter``: image + class names -> label map, by GOCA (or any of its ablations, or the vanilla baseline).

    seg = difffeat.Segmenter("shapes")
    result = seg(image, ["circle", "star"])
    result.labels          # uint8 [H, W]: 0 background, i = classes[i-1]

Pipeline (method.md §3): caption + token alignment -> one forward at t with attention observers (head
aggregation inside the attention computation) -> layer weights from the reference query's pseudo
self-attention -> global map -> per-pixel rescaling -> blur, min-max -> self-attention propagation ->
background = tau + supporting map -> argmax.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backbones.base import Backbone, check_timestep
from ..backbones.loading import load
from ..capture import Capture, MapReducer, catalog_of, head_mean
from ..errors import ConfigError, InvalidOptionError, UnknownActivationError
from ..hookpoints import load_table
from ..images import ImageInput, loaded_size, original_size, to_rgb
from .aggregation import GocaHeadReducer, combine_layers, layer_weights, weights_from_scores
from .layerscores import LayerScoreStream
from .memory import MapGeometry, choose_passes
from .postprocess import postprocess_labels
from .prompts import FILLERS, PromptLayout, build_layout
from .vocabulary import class_words
from .rescale import class_scores, gaussian_blur, minmax, rescale_by_content
from .selfmaps import SelfMapStream, grid_of, mean_self_map, propagate
from .settings import DEFAULT_CONFIG, SegmentSettings, settings_for

__all__ = ["decide", "goca_scores", "global_map", "goca_layer_weights", "map_grid"]


def decide(
    class_maps: torch.Tensor, background: torch.Tensor, size: tuple[int, int], postprocess: str = "none", image: np.ndarray | None = None
) -> np.ndarray:
    """Label maps ``uint8 [B, H, W]``: argmax over {background, classes} after bilinear upsampling of the
    scores ``[B, n, h, w]`` and ``[B, h, w]`` to ``size`` (H, W), then ``postprocess`` ("pamr", "crf") with
    the RGB ``image`` ``uint8 [H, W, 3]`` (see :func:`difffeat.segment.postprocess.postprocess_labels`)."""
    stack = torch.cat([background[:, None].float(), class_maps.float()], dim=1)
    full = F.interpolate(stack, size=tuple(size), mode="bilinear", align_corners=False)
    labels = full.max(dim=1).indices.to(torch.uint8).cpu().numpy()  # = argmax (first maximum), faster on the CPU
    if postprocess != "none":
        labels = np.stack([postprocess_labels(postprocess, full[i], labels[i], image) for i in range(len(labels))])
    return labels


def decide_labels(
    class_maps: torch.Tensor, background: torch.Tensor, size: tuple[int, int], postprocess: str = "none", image: np.ndarray | None = None
) -> np.ndarray:
    """One image's labels ``uint8 [H, W]`` at ``size`` (H, W), the input's own size: :func:`decide` from the scores
    ``[n, h, w]`` / ``[h, w]`` at the size the image was loaded at (:func:`~difffeat.images.loaded_size`: the
    same, or ~16 MP for a larger input), then enlarged nearest to ``size`` when that is larger. ``image``: the
    RGB input as loaded, for ``postprocess``."""
    w, h = loaded_size((size[1], size[0]))
    labels = decide(class_maps[None], background[None], (h, w), postprocess, image)[0]
    if (h, w) != tuple(size):
        labels = np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return labels


def map_grid(acts: Mapping[str, torch.Tensor], grid: tuple[int, int], cross_names: Sequence[str]) -> tuple[int, int]:
    """The largest grid (h, w) of the cross maps ``[B, HW_m, T]`` at ``cross_names``: the global map's grid."""
    return max((grid_of(acts[n].shape[1], grid) for n in cross_names), key=lambda g: g[0] * g[1])


def goca_layer_weights(
    s: SegmentSettings,
    acts: Mapping[str, torch.Tensor],
    grid: tuple[int, int],
    cross_names: Sequence[str],
    self_names: Sequence[str],
    ref_name: str,
) -> torch.Tensor:
    """The layer weights ``s_m`` ``[B, M]`` of :func:`global_map`: GOCA's reference-feature weights
    (:func:`~difffeat.segment.aggregation.layer_weights` of the reference feature at ``ref_name`` and the self
    maps at ``self_names``) for ``layers="goca"``, uniform ``1/M`` otherwise."""
    maps = [acts[n] for n in cross_names]
    if s.layers != "goca":
        return torch.full((maps[0].shape[0], len(maps)), 1.0 / len(maps), device=maps[0].device)
    size = map_grid(acts, grid, cross_names)
    ref = acts[ref_name].float()
    if s.pseudo_grid == "map" and tuple(ref.shape[-2:]) != size:
        ref = F.interpolate(ref, size=size, mode="bilinear", align_corners=False)
    selfs = [acts[n].float() for n in self_names]
    mass = s.self_map_resize == "mass-preserving"
    return layer_weights(ref, selfs, [grid_of(x.shape[1], grid) for x in selfs], s.ref_channels == "first", mass)


def global_map(
    s: SegmentSettings,
    acts: Mapping[str, torch.Tensor],
    grid: tuple[int, int],
    cross_names: Sequence[str],
    self_names: Sequence[str],
    ref_name: str,
    layer_scores: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GOCA's global map ``A = sum_m s_m upsample(A_m)`` (clamped at 0, each pixel renormalised over text
    positions) at the largest map grid: ``[B, T, H, W]``, and the layer weights ``s_m`` ``[B, M]``
    (:func:`goca_layer_weights`). ``acts`` as :func:`goca_scores` takes them; ``layer_scores`` ``[B, M]``: the
    scores ``<P, U(S_m)>`` when they were formed during the forward (:mod:`difffeat.segment.layerscores`; then
    no self map or reference feature is needed); ``weights`` ``[B, M]``: the layer weights themselves when
    already known (then neither is read either)."""
    maps = [acts[n].float() for n in cross_names]  # [B, HW_m, T]
    grids = [grid_of(m.shape[1], grid) for m in maps]
    size = max(grids, key=lambda g: g[0] * g[1])
    if weights is None and s.layers == "goca" and layer_scores is not None:
        weights = weights_from_scores(layer_scores.float())
    elif weights is None:
        weights = goca_layer_weights(s, acts, grid, cross_names, self_names, ref_name)
    return combine_layers(maps, grids, weights, size), weights


def goca_scores(
    s: SegmentSettings,
    layout: PromptLayout,
    acts: Mapping[str, torch.Tensor],
    grid: tuple[int, int],
    cross_names: Sequence[str],
    self_names: Sequence[str],
    ref_name: str,
    refine_names: Sequence[str],
    refine_mean: torch.Tensor | None = None,
    layer_scores: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GOCA's decision maths on captured activations: layer weights, global map, rescaling, blur + min-max,
    background entities, refinement.

    Args:
        s: the settings (layers, rescale, the departure settings, refine_order, blur).
        layout: caption token bookkeeping (class, entity and content token positions).
        acts: head-aggregated cross maps ``[B, HW_m, T]`` at ``cross_names``, head-averaged self maps
            ``[B, HW_m, HW_m]`` at ``self_names`` / ``refine_names``, the reference feature ``[B, C, h, w]`` at
            ``ref_name``.
            A self map may also come reduced to the reference grid (``U(S_m)``, :mod:`difffeat.segment.selfmaps`).
        grid: the input grid (h, w) the token counts are measured against (:func:`grid_of`).
        refine_mean: the refinement mean ``[B, HW, HW]`` when it was accumulated during the forward
            (then the ``refine_names`` maps are not needed).
        layer_scores: the layer scores ``[B, M]`` when they were formed during the forward (then the
            ``self_names`` maps and the reference feature are not needed).
        weights: the layer weights ``[B, M]`` when already known (:func:`goca_layer_weights`; then the
            ``self_names`` maps and the reference feature are not needed).
    Returns:
        class maps ``[B, n_classes, H, W]``, supporting map ``[B, H, W]`` (zeros without entities), layer
        weights ``[B, M]``; (H, W) is the largest map grid.
    """
    a, weights = global_map(s, acts, grid, cross_names, self_names, ref_name, layer_scores, weights)  # [B, T, H, W]
    size = tuple(a.shape[-2:])
    mass = s.self_map_resize == "mass-preserving"
    groups = layout.class_tokens + layout.entity_tokens
    scores = class_scores(a, groups)
    if s.rescale == "goca":
        if len(groups) > 1:
            scores = rescale_by_content(scores, a, layout.content_tokens)
        else:  # one content group: its share of content attention is 1 at every pixel -> no information
            warnings.warn(
                "per-pixel rescaling needs at least two content groups (classes or background entities); "
                "with one class and no background entity it is skipped",
                stacklevel=3,
            )
    scores = minmax(gaussian_blur(scores, s.blur_kernel, s.blur_sigma))
    n_cls = len(layout.classes)
    has_entities = scores.shape[1] > n_cls
    if has_entities and s.entity_merge == "before-refine":
        scores = torch.cat([scores[:, :n_cls], scores[:, n_cls:].amax(dim=1, keepdim=True)], dim=1)
    if s.refine_order > 0:
        if refine_mean is None:
            refine_mean = mean_self_map(acts, refine_names, grid, size, mass)
        scores = propagate(scores, refine_mean, s.refine_order)
    cls_maps, ent_maps = scores[:, :n_cls], scores[:, n_cls:]
    support = ent_maps.amax(dim=1) if has_entities else torch.zeros_like(cls_maps[:, 0])
    return cls_maps, support, weights


@dataclass
class Observation:
    """What one segmentation forward captured (see :meth:`Segmenter.observe`)."""

    image: Image.Image
    layout: PromptLayout
    activations: dict[str, torch.Tensor]
    grid: tuple[int, int]
    heads: str
    #: the refinement mean ``[B, HW, HW]`` accumulated during the forward (None: from the refinement maps)
    refine_mean: torch.Tensor | None = None
    #: the settings the self maps were reduced under during the forward (None: full head-mean maps)
    reduced: dict[str, Any] | None = None
    #: the layer scores ``[B, M]`` formed during a two-pass observation's forward (None: one pass)
    layer_scores: torch.Tensor | None = None


@dataclass
class SegmentationResult:
    """One image's segmentation.

    Attributes:
        labels: ``uint8 [H, W]`` at the input image's size; 0 = background, i = ``classes[i-1]``.
        class_maps: ``[n_classes, h, w]`` final class scores in [0, 1] at map resolution.
        background: ``[h, w]`` background score (tau + supporting map).
        support: ``[h, w]`` supporting map (background entities) without tau.
        classes, caption: what was segmented and the prompt used.
        layer_names, layer_weights: the combined cross-attention layers and their weights.
        settings: the settings used (dict).
        image: ``uint8 [H, W, 3]`` RGB input, kept only when the settings post-process (for :meth:`with_tau`).
    """

    labels: np.ndarray
    class_maps: torch.Tensor
    background: torch.Tensor
    support: torch.Tensor
    classes: list[str]
    caption: str
    layer_names: list[str] = field(default_factory=list)
    layer_weights: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)

    def with_tau(self, tau: float) -> "SegmentationResult":
        """The same result decided with another background offset (no new forward)."""
        background = tau + self.support
        return replace(
            self,
            labels=decide_labels(self.class_maps, background, self.labels.shape, self.settings.get("postprocess", "none"), self.image),
            background=background,
            settings={**self.settings, "tau": float(tau)},
        )

    @property
    def class_index(self) -> dict[str, int]:
        """Label value of each class (0 is background)."""
        return {c: i + 1 for i, c in enumerate(self.classes)}

    def heatmap(self, cls: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """Class score map in [0, 1] as float ``[H, W]`` (the image's size as loaded, at most ~16 MP, unless
        ``size`` = (H, W) is given)."""
        i = self.classes.index(cls)
        m = self.class_maps[i][None, None].float()
        h, w = size or loaded_size(self.labels.shape[::-1])[::-1]
        return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).cpu().numpy()

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": {"background": 0, **self.class_index},
            "caption": self.caption,
            "size": list(self.labels.shape),
            "pixels_per_class": {c: int((self.labels == i).sum()) for c, i in {"background": 0, **self.class_index}.items()},
            "layers": [{"name": n, "weight": w} for n, w in zip(self.layer_names, self.layer_weights)],
            "settings": self.settings,
        }


class Segmenter:
    """Training-free segmentation from a diffusion model's cross-attention (GOCA).

    Args:
        model: a :class:`Backbone` or anything :func:`difffeat.load` accepts (default: the embedded model).
        settings: a :class:`SegmentSettings`; default: the named ``config``.
        config: ``"default"`` (``configs/goca/<model or family>.yaml``) or ``"goca-reference"`` (the published
            pipeline of Darkbblue/goca for the model's family, ``configs/goca/goca-reference/<family>.yaml``);
            :func:`difffeat.segment.settings.config_names` lists them. Ignored when ``settings`` is given.
        method: "goca" or "vanilla" (shortcut for the three switches).
        **overrides: any :class:`SegmentSettings` field (``heads="mean"``, ``tau=0.1``, ``t=200`` ...).
    """

    def __init__(
        self,
        model: Backbone | str | os.PathLike = "shapes",
        settings: SegmentSettings | None = None,
        method: str | None = None,
        config: str = DEFAULT_CONFIG,
        **overrides: Any,
    ) -> None:
        self.backbone = load(model)
        base = settings or settings_for(os.path.basename(str(self.backbone.name)).lower(), self.backbone.family, config)
        if method is not None:
            base = base.with_method(method)
        self.settings = base.update(**overrides)
        # refinement blocks a config file lists for the family may be absent from a model of another layout
        self._config_refine = settings is None and overrides.get("refine_blocks") is None
        self._goca_reducer: GocaHeadReducer | None = None  # made on first use, kept: its W_O^T W_O serve every observation
        check_timestep(self.settings.t)
        self._plan()

    # ------------------------------------------------------------------ which activations
    def _plan(self) -> None:
        cat = catalog_of(self.backbone)
        suffix = load_table(self.backbone.hook_table).goca
        cross_all = [a for a in cat if a.name.endswith("." + suffix["cross"]) and a.kind == "cross-map"]
        if not cross_all:
            raise ConfigError(f"{self.backbone.name} has no cross-attention maps; GOCA needs a text-conditioned model")
        block_of = {a.name: a.name[: -len(suffix["cross"]) - 1] for a in cross_all}
        blocks = [block_of[a.name] for a in cross_all]
        if self.settings.map_layers:
            missing = [b for b in self.settings.map_layers if b not in blocks]
            if missing:
                raise ConfigError(f"map_layers {missing} have no cross-attention; blocks with one: {blocks}")
            blocks = list(self.settings.map_layers)
        self.blocks = blocks
        self.cross_names = [f"{b}.{suffix['cross']}" for b in blocks]
        self.self_names = [f"{b}.{suffix['self']}" for b in blocks]
        hw = {b: cat[f"{b}.{suffix['cross']}"].shape[1] for b in blocks}
        largest = max(hw.values())
        at_largest = [b for b in blocks if hw[b] == largest]
        ref = self.settings.ref_block
        if f"{ref}.{suffix['query']}" not in cat and ref != "auto" and ref in cat:
            # a full activation name (FLUX's published reference feature is an attention output)
            self.ref_block, self.ref_name = ref, ref
        else:
            if ref == "auto" or f"{ref}.{suffix['query']}" not in cat:
                up = [b for b in at_largest if b.startswith("up_blocks")]
                ref = up[0] if up else at_largest[len(at_largest) // 2]
            self.ref_block = ref
            self.ref_name = f"{ref}.{suffix['query']}"
        refine = [f"{b}.{suffix['self']}" for b in self.settings.refine_blocks]
        present = [name for name in refine if name in cat]
        if len(present) < len(refine) and self._config_refine:
            # the family's published list on a model of another layout (e.g. a tiny test model)
            missing = [b for b, name in zip(self.settings.refine_blocks, refine) if name not in cat]
            warnings.warn(
                f"{self.backbone.name} lacks the configured refinement block(s) {missing}; "
                + ("using the others" if present else "using every block at the largest attention grid"),
                stacklevel=3,
            )
            refine = present
        self.refine_names = refine or [f"{b}.{suffix['self']}" for b in at_largest]
        for name in self.refine_names:
            cat[name]  # clear error for a bad configured block

    def activation_names(self, everything: bool = False) -> list[str]:
        """Everything one segmentation forward captures (depends on the settings; ``everything=True``: what
        any layer/refinement setting needs, so one observation serves every ablation)."""
        names = list(self.cross_names)
        if self.settings.layers == "goca" or everything:
            names += self.self_names + [self.ref_name]
        if self.settings.refine_order > 0 or everything:
            names += self.refine_names
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ run
    def __call__(
        self,
        image: ImageInput,
        classes: Sequence[str] | str,
        entities: Sequence[str] | None = None,
        caption: str | None = None,
        class_phrases: Sequence[Sequence[str]] | None = None,
    ) -> SegmentationResult:
        """Segment one image into ``classes`` (+ background). ``entities``: extra background entities;
        ``caption``: the prompt (instead of the template), which must contain every class and entity;
        ``class_phrases``: per class, the caption phrases that are its tokens (default: its name)."""
        return self.decide(self.observe(image, classes, entities, caption, class_phrases=class_phrases))

    def prepare(
        self,
        image: ImageInput,
        classes: Sequence[str] | str,
        entities: Sequence[str] | None = None,
        caption: str | None = None,
        class_phrases: Sequence[Sequence[str]] | None = None,
    ) -> "tuple[PromptLayout, Any]":
        """The caption layout and the denoiser inputs (noised latents at ``t``, prompt conditioning) of one
        segmentation forward: what :meth:`observe` runs the denoiser on."""
        s = self.settings
        layout = self._layout(classes, entities, caption, class_phrases)
        return layout, self.backbone.prepare([to_rgb(image)], layout.caption, s.t, s.seed, s.resolution, s.resize == "square",
                                              s.vae_latents == "sample")

    def _layout(self, classes, entities, caption, class_phrases) -> PromptLayout:
        """One image's caption and token layout (class words normalised unless a caption is given)."""
        s = self.settings
        ents = list(s.background_entities) + list(entities or [])
        classes = classes if caption is not None else class_words(classes, self.backbone)  # case, plurals, unknown words
        return build_layout(classes, self.backbone.text_segments(), s.template, ents, caption, class_phrases,
                            FILLERS[s.filler_words])

    def observe(
        self,
        image: ImageInput,
        classes: Sequence[str] | str,
        entities: Sequence[str] | None = None,
        caption: str | None = None,
        everything: bool = False,
        head_reducers: Mapping[str, MapReducer] | None = None,
        class_phrases: Sequence[Sequence[str]] | None = None,
    ) -> "Observation":
        """The forward half: caption, token alignment, one denoiser forward with the observers installed.

        Args:
            everything: capture what any layer/refinement setting needs, so that one observation can be
                decided under every ablation.
            head_reducers: for experiments, ``{cross-attention name: reducer}`` replacing the ``heads``
                setting's reduction on those layers (the others keep it), e.g.
                ``{name: FixedHeadWeights([...])}`` with names from :attr:`cross_names`. The observation is
                then marked ``heads="custom"`` and can be decided under any ``heads`` setting.
        """
        return self.observe_batch([image], [classes], [entities], [caption], everything, head_reducers, [class_phrases])[0]

    def observe_batch(
        self,
        images: Sequence[ImageInput],
        classes: Sequence[Sequence[str] | str],
        entities: Sequence[Sequence[str] | None] | None = None,
        captions: Sequence[str | None] | None = None,
        everything: bool = False,
        head_reducers: Mapping[str, MapReducer] | None = None,
        class_phrases: Sequence[Sequence[Sequence[str]] | None] | None = None,
    ) -> list["Observation"]:
        """:meth:`observe` for several images in one forward: one class list (and optional entities /
        caption) per image, each image its own caption and token layout (prompts padded by the text
        encoder). Images must preprocess to the same size (:meth:`segment` groups them); each observation
        equals the image's own :meth:`observe` (batch independence: the same noise for every image)."""
        s = self.settings
        n = len(images)
        entities = list(entities) if entities is not None else [None] * n
        captions = list(captions) if captions is not None else [None] * n
        class_phrases = list(class_phrases) if class_phrases is not None else [None] * n
        if not n or len(classes) != n or len(entities) != n or len(captions) != n:
            raise ValueError(f"observe_batch needs one class list, entity list and caption per image; got {n} images, "
                             f"{len(classes)} class lists, {len(entities)} entity lists, {len(captions)} captions")
        self._check_head_reducers(head_reducers)
        rgbs = [to_rgb(im) for im in images]
        layouts = [self._layout(cls, ent, cap, phr) for cls, ent, cap, phr in zip(classes, entities, captions, class_phrases)]
        inputs = self.backbone.prepare(rgbs, [lay.caption for lay in layouts], s.t, s.seed, s.resolution, s.resize == "square",
                                              s.vae_latents == "sample")
        return self.observe_prepared(rgbs, layouts, inputs, everything, head_reducers)

    def observe_prepared(
        self,
        images: Sequence[Image.Image],
        layouts: Sequence[PromptLayout],
        inputs: Any,
        everything: bool = False,
        head_reducers: Mapping[str, MapReducer] | None = None,
    ) -> list["Observation"]:
        """The observed forward of :meth:`observe_batch` on inputs already prepared (``backbone.prepare`` of
        the RGB ``images`` with the ``layouts``' captions): one observation per image.

        Without ``everything``, the self maps are reduced during the forward to what the settings' decision
        needs (:mod:`difffeat.segment.selfmaps`): no ``[HW, HW]`` map per block is kept. In two passes
        (:meth:`passes`), a forward up to the reference feature comes first and the layer scores are formed
        during the observed forward (:mod:`difffeat.segment.layerscores`)."""
        s = self.settings
        custom = self._check_head_reducers(head_reducers)
        if self.passes(inputs, everything) == "two-pass":
            return self._observe_two_pass(images, layouts, inputs, custom)
        reducers, stream = self.observation_reducers(tuple(inputs.grid), everything)
        reducers.update(custom)
        with Capture(self.backbone, self.activation_names(everything), inputs, early_exit=True, map_reducer=head_mean,
                     map_reducers=reducers, fuse_output=True) as cap:
            self.backbone.denoise(inputs)
        heads = "custom" if custom else s.heads
        acts = cap.activations
        refine_mean, reduced = None, None
        if stream is not None:
            ref = acts.get(self.ref_name)
            refine_mean = stream.finish(acts, tuple(ref.shape[-2:]) if ref is not None else None)
            reduced = self._reduced_settings()
        if len(images) == 1:
            return [Observation(images[0], layouts[0], acts, tuple(inputs.grid), heads, refine_mean, reduced)]
        return [
            Observation(rgb, lay, {k: v[i : i + 1] for k, v in acts.items()}, tuple(inputs.grid), heads,
                        None if refine_mean is None else refine_mean[i : i + 1], reduced)
            for i, (rgb, lay) in enumerate(zip(images, layouts))
        ]

    def map_geometry(self, inputs: Any) -> MapGeometry:
        """The grids of this segmenter's maps in the forward of ``inputs`` (its token grid and image size),
        from the catalog's shapes at the probe size (no forward): what :meth:`passes` accounts."""
        cat = catalog_of(self.backbone)
        (gh, gw), (ih, iw) = tuple(inputs.grid), tuple(inputs.image_size)
        ph, pw = cat.probe_size or (self.backbone.native_resolution,) * 2
        probe_grid = (max(1, round(ph * gh / ih)), max(1, round(pw * gw / iw)))  # same pixels per token

        def at_input(name: str) -> tuple[int, int]:  # the map's level at the probe, at this forward's grid
            sh, sw = grid_of(cat[name].shape[1], probe_grid)
            return math.ceil(gh / (probe_grid[0] // sh)), math.ceil(gw / (probe_grid[1] // sw))

        ref_shape = cat[self.ref_name].shape
        if ref_shape is not None and len(ref_shape) == 3:
            ref_level = (probe_grid[0] // ref_shape[1], probe_grid[1] // ref_shape[2])
            reference, channels = (math.ceil(gh / ref_level[0]), math.ceil(gw / ref_level[1])), ref_shape[0]
        else:
            reference, channels = (gh, gw), 1
        s = self.settings
        text = inputs.text_len or cat[self.cross_names[0]].shape[2]
        return MapGeometry(
            cross={n: at_input(n) for n in self.cross_names},
            weight={n: at_input(n) for n in self.self_names} if s.layers == "goca" else {},
            refine={n: at_input(n) for n in self.refine_names} if s.refine_order > 0 else {},
            reference=reference, ref_channels=int(channels), text_tokens=int(text),
        )

    def passes(self, inputs: Any, everything: bool = False) -> str:
        """How :meth:`observe_prepared` observes the forward of ``inputs``: "one-pass" or "two-pass" (the
        ``memory`` setting; "auto" decides from :meth:`map_geometry` by :func:`~difffeat.segment.memory.choose_passes`,
        before any forward). One pass with ``everything`` (every whole map is kept) or ``layers="uniform"``
        (no layer scores)."""
        s = self.settings
        if everything or s.layers != "goca" or s.memory == "one-pass":
            return "one-pass"
        if s.memory == "two-pass":
            return "two-pass"
        try:
            geo = self.map_geometry(inputs)
        except ValueError:  # grids that are not power-of-two levels of the input: not accounted
            return "one-pass"
        return choose_passes(s.memory, geo, inputs.batch_size or 1, s.map_budget_mb, s.pseudo_grid, s.ref_channels == "first")

    def _observe_two_pass(self, images: Sequence[Image.Image], layouts: Sequence[PromptLayout], inputs: Any,
                          custom: Mapping[str, MapReducer]) -> list["Observation"]:
        """:meth:`observe_prepared` in two passes: the forward up to the reference feature (stopped there),
        then the observed forward scoring every layer-weight self map against ``P`` as it is computed."""
        s = self.settings
        with Capture(self.backbone, [self.ref_name], inputs, early_exit=True) as first:
            self.backbone.denoise(inputs)
        if self.ref_name not in first.activations:
            raise RuntimeError(f"the forward never reached the reference feature {self.ref_name!r}")
        ref = first.activations.pop(self.ref_name)
        geo = self.map_geometry(inputs)
        if s.pseudo_grid == "map" and tuple(ref.shape[-2:]) != geo.largest:
            ref = F.interpolate(ref.float(), size=geo.largest, mode="bilinear", align_corners=False)
        stream = LayerScoreStream(ref, geo.weight, geo.refine, geo.largest, s.ref_channels == "first",
                                  s.self_map_resize == "mass-preserving")
        del ref
        reducers: dict[str, MapReducer] = {}
        if s.heads == "goca":
            reducers = dict.fromkeys(self.cross_names, self.goca_reducer())
        reducers.update(stream.reducers())
        reducers.update(custom)
        names = list(dict.fromkeys([*self.cross_names, *stream.names()]))
        with Capture(self.backbone, names, inputs, early_exit=True, map_reducer=head_mean, map_reducers=reducers,
                     fuse_output=True) as cap:
            self.backbone.denoise(inputs)
        acts = cap.activations
        scores, refine_mean = stream.finish(acts)
        heads = "custom" if custom else s.heads
        reduced = self._reduced_settings(two_pass=True)
        grid = tuple(inputs.grid)
        return [
            Observation(rgb, lay, {k: v[i : i + 1] for k, v in acts.items()} if len(images) > 1 else acts, grid, heads,
                        None if refine_mean is None else refine_mean[i : i + 1], reduced, scores[i : i + 1])
            for i, (rgb, lay) in enumerate(zip(images, layouts))
        ]

    def observation_reducers(self, grid: tuple[int, int], everything: bool = False) -> tuple[dict[str, MapReducer], SelfMapStream | None]:
        """The map reducers of one observed forward at the input token ``grid``: GOCA's head weights on the
        cross maps (``heads="goca"``), and the self-map reductions (:class:`SelfMapStream`, a fresh one per
        forward; None with ``everything`` or when the maps are kept whole). Pass the reducers to
        :class:`~difffeat.capture.Capture` (``map_reducer=head_mean`` for the rest) and, after the forward,
        ``stream.finish(acts, reference grid)`` gives the refinement mean."""
        reducers: dict[str, MapReducer] = {}
        if self.settings.heads == "goca":
            reducers = dict.fromkeys(self.cross_names, self.goca_reducer())
        stream = None if everything else self._self_map_stream(tuple(grid))
        if stream is not None:
            reducers.update(stream.reducers())
        return reducers, stream

    def _reduced_settings(self, two_pass: bool = False) -> dict[str, Any]:
        """What an observation with reduced self maps can only be decided under (two passes: also the
        reference channels and the combined layers, which its layer scores were formed with)."""
        s = self.settings
        out = {"layers": s.layers, "self_map_resize": s.self_map_resize, "pseudo_grid": s.pseudo_grid,
               "refine": s.refine_order > 0, "refine_names": tuple(self.refine_names), "ref_name": self.ref_name}
        if two_pass:
            out.update(ref_channels=s.ref_channels, self_names=tuple(self.self_names))
        return out

    def _self_map_stream(self, input_grid: tuple[int, int]) -> SelfMapStream | None:
        """The self-map reductions for these settings (:class:`SelfMapStream`), or None when the maps are kept
        whole (grids that are not clean power-of-two levels of each other at the catalog's probe size)."""
        s = self.settings
        cat = catalog_of(self.backbone)
        hw = lambda name: cat[name].shape[1]  # noqa: E731 - query pixels of a map at the probe size ([heads, HW, K])
        factors: dict[str, int] = {}
        if s.layers == "goca":
            ref_shape = cat[self.ref_name].shape
            if ref_shape is None or len(ref_shape) != 3:
                return None
            ref_hw = ref_shape[1] * ref_shape[2]
            for name in self.self_names:
                ratio = hw(name) / ref_hw
                f = round(math.sqrt(ratio)) if ratio >= 1 else 1
                if ratio >= 1 and (f * f * ref_hw != hw(name) or f & (f - 1)):
                    return None
                factors[name] = f if s.pseudo_grid == "reference" else 1
        refine = self.refine_names if s.refine_order > 0 else []
        largest = max(hw(name) for name in self.cross_names)
        if any(hw(name) != largest for name in refine):
            return None  # refinement maps resized to the largest grid: kept whole
        if all(factors.get(name, 0) == 1 for name in refine):
            refine = []  # every refinement map is kept whole for the layer weights: a sum would only add one
        if not refine and all(f == 1 for f in factors.values()):
            return None  # nothing to reduce
        return SelfMapStream(factors, refine, s.self_map_resize == "mass-preserving", input_grid)

    def _check_head_reducers(self, head_reducers: Mapping[str, MapReducer] | None) -> dict[str, MapReducer]:
        """``head_reducers`` keyed by canonical cross-attention names; a clear error for any other key."""
        out = {}
        for name, reducer in (head_reducers or {}).items():
            canonical = catalog_of(self.backbone).canonical(name)  # paper aliases too
            if canonical not in self.cross_names:
                raise UnknownActivationError(
                    name, self.cross_names, hint="head_reducers keys must be this segmenter's cross-attention maps (Segmenter.cross_names)."
                )
            if not callable(reducer):
                raise ConfigError(f"head_reducers[{name!r}] is {reducer!r}, not a map reducer (e.g. FixedHeadWeights([...]))")
            out[canonical] = reducer
        return out

    def decide(self, obs: "Observation") -> SegmentationResult:
        """The decision half: layer weights, global map, rescaling, refinement, background, argmax. An
        observation made with the same head setting (or with custom ``head_reducers``) can be decided under
        other layer/rescale/tau settings."""
        if obs.heads not in (self.settings.heads, "custom"):
            raise ConfigError(f"observation made with heads={obs.heads!r} cannot be decided with heads={self.settings.heads!r}")
        mine = self._reduced_settings(two_pass=obs.layer_scores is not None)
        if obs.reduced is not None and obs.reduced != mine:
            differ = sorted(k for k, v in mine.items() if obs.reduced.get(k) != v)
            raise ConfigError(
                f"this observation kept its self maps reduced for its own settings, which differ in {differ}; "
                "observe with everything=True to decide one observation under other layer/refinement settings"
            )
        return self._decide(obs.image, obs.layout, obs.activations, obs.grid, obs.refine_mean, obs.layer_scores)

    def goca_reducer(self) -> GocaHeadReducer:
        """The GOCA head-weight reducer of this segmenter's observations: one for every layer and every observation,
        so each layer's ``W_O^T W_O`` is formed once (after :func:`~difffeat.segment.aggregation.gram_break_even_rows`
        query rows) and then reused; it keeps ``(heads*d)^2`` float32 per cross-attention layer
        (``goca_reducer().kept_bytes()``)."""
        if self._goca_reducer is None:
            self._goca_reducer = GocaHeadReducer(self._output_weights())
        return self._goca_reducer

    def _output_weights(self) -> dict[int, torch.Tensor]:
        """W_O for attention modules without ``to_out`` (FLUX single-stream: the block's proj_out columns
        that act on the attention output)."""
        weights = {}
        den = self.backbone.denoiser
        for name in self.cross_names:
            attn_path = name.rsplit(".", 1)[0]
            attn = den.get_submodule(attn_path)
            if getattr(attn, "to_out", None) is None:
                block = den.get_submodule(attn_path.rsplit(".", 1)[0])
                proj = getattr(block, "proj_out", None)
                if proj is not None:
                    weights[id(attn)] = proj.weight[:, : attn.inner_dim]
        return weights

    def _decide(self, rgb: Image.Image, layout: PromptLayout, acts: dict[str, torch.Tensor], grid: tuple[int, int],
                refine_mean: torch.Tensor | None = None, layer_scores: torch.Tensor | None = None) -> SegmentationResult:
        s = self.settings
        cls_maps, support, weights = goca_scores(
            s, layout, acts, grid, self.cross_names, self.self_names, self.ref_name, self.refine_names, refine_mean,
            layer_scores,
        )
        background = s.tau + support  # [B, H, W]
        w0, h0 = original_size(rgb)  # the input's own size, also when to_rgb downscaled a huge one
        image = np.asarray(rgb.convert("RGB")) if s.postprocess != "none" else None
        labels = decide_labels(cls_maps[0], background[0], (h0, w0), s.postprocess, image)
        return SegmentationResult(
            labels=labels,
            class_maps=cls_maps[0].cpu(),
            background=background[0].cpu(),
            support=support[0].cpu(),
            classes=list(layout.classes),
            caption=layout.caption,
            layer_names=list(self.blocks),
            layer_weights=[float(x) for x in weights[0]],
            settings={**s.to_dict(), "model": str(self.backbone.name), "ref_block": self.ref_block},
            image=image,
        )

    def segment(
        self,
        images: Sequence[ImageInput],
        classes: Sequence[str] | Sequence[Sequence[str]],
        progress: bool = False,
        batch_size: int = 1,
        entities: Sequence[Sequence[str] | None] | None = None,
        captions: Sequence[str | None] | None = None,
        class_phrases: Sequence[Sequence[Sequence[str]] | None] | None = None,
    ):
        """Segment several images, yielding one :class:`SegmentationResult` per image in order; ``classes`` is
        one list for all images or one list per image; ``entities``, ``captions``, ``class_phrases``
        (optional) give one value per image, as :meth:`__call__` takes them. ``batch_size`` images run per
        forward (consecutive images that preprocess to the same size; others form their own batches);
        results equal batch 1."""
        from tqdm.auto import tqdm

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidOptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        images = list(images)
        per_image = classes and not isinstance(classes, str) and not isinstance(classes[0], str)
        if per_image and len(classes) != len(images):
            raise ValueError(f"got {len(classes)} class lists for {len(images)} images")
        class_lists = list(classes) if per_image else [classes] * len(images)
        extras = [list(x) if x is not None else [None] * len(images) for x in (entities, captions, class_phrases)]
        if any(len(x) != len(images) for x in extras):
            raise ValueError(f"entities, captions and class_phrases need one entry per image ({len(images)})")
        bar = tqdm(total=len(images), desc="segment", unit="img", disable=not progress)
        for start in range(0, len(images), batch_size):
            chunk = [to_rgb(im) for im in images[start : start + batch_size]]
            buckets: dict[tuple[int, int], list[int]] = {}
            for i, rgb in enumerate(chunk):
                buckets.setdefault(self._input_size(rgb), []).append(i)
            results: dict[int, SegmentationResult] = {}
            for members in buckets.values():
                ents, caps, phrases = ([x[start + i] for i in members] for x in extras)
                obs = self.observe_batch([chunk[i] for i in members], [class_lists[start + i] for i in members], ents,
                                         caps, class_phrases=phrases)
                results.update({i: self.decide(o) for i, o in zip(members, obs)})
            for i in range(len(chunk)):
                bar.update(1)
                yield results[i]
        bar.close()

    def _input_size(self, rgb: Image.Image) -> tuple[int, int]:
        """The (W, H) the backbone feeds ``rgb`` to the VAE at (images of one size can share a forward)."""
        from ..images import target_size

        return target_size(rgb.size, self.settings.resolution or self.backbone.native_resolution, self.backbone.size_multiple,
                           self.settings.resize == "square")
