"""``FeatureExtractor``: images (+ prompts) -> ``{name: [B, C, H, W]}`` from one denoiser forward.

    backbone = difffeat.load("shapes")
    fx = difffeat.FeatureExtractor(backbone, preset="shapes-practical")
    feats = fx(images, prompts="a photo of shapes")      # {name: tensor [B, C, H, W]}
    dense = difffeat.upsample_concat(feats, size=(64, 64))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbones.base import Backbone, check_timestep
from .backbones.loading import load
from .capture import Capture, catalog_of, head_mean, sequence_to_spatial
from .catalog import ActivationInfo
from .checks import check_resolution
from .errors import ConfigError, InvalidImageError, InvalidOptionError, InvalidPromptError
from .images import ImageInput, target_size, to_rgb
from .presets import FeaturePreset, load_preset


def upsample_concat(
    features: dict[str, torch.Tensor], size: tuple[int, int] | None = None, mode: str = "bilinear"
) -> torch.Tensor:
    """Upsample every ``[B, C_i, H_i, W_i]`` map to ``size`` (default: the largest) and concatenate along
    channels -> ``[B, sum C_i, H, W]`` (the paper's aggregation for dense tasks).

    Raises:
        InvalidOptionError: ``features`` is empty or not a dict of ``[B, C, H, W]`` tensors.
    """
    if not isinstance(features, dict) or not features:
        raise InvalidOptionError(
            f"upsample_concat needs a non-empty dict {{name: [B, C, H, W] tensor}} (what FeatureExtractor returns), "
            f"got {features!r:.80}"
        )
    bad = [name for name, v in features.items() if not isinstance(v, torch.Tensor) or v.ndim != 4]
    if bad:
        raise InvalidOptionError(f"upsample_concat needs [B, C, H, W] tensors; {bad[0]!r} is "
                                 f"{getattr(features[bad[0]], 'shape', type(features[bad[0]]).__name__)}")
    if size is None:
        size = max((tuple(v.shape[-2:]) for v in features.values()), key=lambda hw: hw[0] * hw[1])
    maps = []
    for v in features.values():
        v = v.float()
        if tuple(v.shape[-2:]) != tuple(size):
            v = F.interpolate(v, size=size, mode=mode, align_corners=False if mode in ("bilinear", "bicubic") else None)
        maps.append(v)
    return torch.cat(maps, dim=1)


@dataclass
class ExtractedItem:
    """Features of one image: ``features`` maps names to ``[C, H, W]``."""

    index: int
    features: dict[str, torch.Tensor]
    prompt: str
    image_size: tuple[int, int]


class FeatureExtractor:
    """Extract diffusion features: one noised forward per batch, hooks only where asked.

    Args:
        backbone: a :class:`Backbone` or anything :func:`difffeat.load` accepts.
        features: activation names (canonical or the papers' aliases; one name may be a plain string); or give
            ``preset``. An empty list is an :class:`~difffeat.errors.InvalidOptionError`, raised before the model loads.
        preset: a preset from ``configs/features`` (``difffeat presets`` lists them).
        t: timestep on the 1000-step scale (default: the preset's, else 50).
        resolution: long side in pixels (default: the preset's, else the model's native resolution).
        square: resize to ``resolution x resolution`` instead of keeping the aspect ratio.
        seed: noise seed; the same seed gives the same features, independent of batch composition.
        batch_size: images per forward.
        early_exit: stop the forward after the last requested activation.
        out_dtype: dtype of returned tensors (default float32); ``out_device`` where they go (default CPU).
        techniques: content-shift suppression techniques applied in order
            (:class:`difffeat.shift.Prompt`, :class:`~difffeat.shift.ControlNet`, :class:`~difffeat.shift.Lora`).
        map_prompt: if set, attention-map features are extracted with this fixed prompt (so their channels mean
            the same tokens across images) while other features use the (technique-rewritten) prompts.

    Attention maps requested as features are averaged over heads and returned as ``[B, K, H, W]`` (K = key
    tokens: text tokens for cross maps, image tokens for self maps).
    """

    def __init__(
        self,
        backbone: Backbone | str | os.PathLike,
        features: Sequence[str] | None = None,
        *,
        preset: str | FeaturePreset | None = None,
        t: int | None = None,
        resolution: int | None = None,
        square: bool = False,
        seed: int = 0,
        batch_size: int = 8,
        early_exit: bool = True,
        out_dtype: torch.dtype = torch.float32,
        out_device: str | torch.device = "cpu",
        techniques: Sequence = (),
        map_prompt: str | None = None,
    ) -> None:
        check_resolution("resolution", resolution)
        if preset is not None and features:
            raise InvalidOptionError("pass either features or preset, not both")
        if preset is None and not features:  # before the model loads
            raise InvalidOptionError(
                "empty feature list: pass features=[...] or preset=...; list names with `difffeat catalog MODEL`"
            )
        if isinstance(features, str):  # one name
            features = [features]
        if batch_size is None or isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidOptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.backbone = load(backbone)
        self.preset = load_preset(preset) if isinstance(preset, str) else preset
        if self.preset is not None:
            if self.preset.family != self.backbone.family:
                raise ConfigError(
                    f"preset {self.preset.name!r} is for the {self.preset.family!r} family but the model is "
                    f"{self.backbone.family!r}; pick a {self.backbone.family} preset (`difffeat presets`)"
                )
            missing = self.preset.missing_in(catalog_of(self.backbone))
            if missing:
                from .presets import presets_for

                fitting = presets_for(self.backbone)
                raise ConfigError(
                    f"preset {self.preset.name!r} is for {', '.join(self.preset.models) or 'another architecture'}; "
                    f"this model ({self.backbone.name}) has no {missing[0]!r}"
                    + (f" (and {len(missing) - 1} more of its activations)" if len(missing) > 1 else "")
                    + ". "
                    + (f"Presets that fit it: {', '.join(fitting)}." if fitting else "No preset fits it; pass features=[...] (see `difffeat catalog MODEL`).")
                )
            features = list(self.preset.features)
        self.infos: list[ActivationInfo] = catalog_of(self.backbone).resolve(features)
        self.t = check_timestep(t if t is not None else (self.preset.t if self.preset else self.backbone.default_feature_t))
        self.resolution = resolution or (self.preset.resolution if self.preset else None) or self.backbone.native_resolution
        self.square = square
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.early_exit = early_exit
        self.out_dtype = out_dtype
        self.out_device = torch.device(out_device)
        self.techniques = list(techniques)
        self.map_prompt = map_prompt

    @property
    def names(self) -> list[str]:
        """Canonical names of the extracted activations, in output order."""
        return [i.name for i in self.infos]

    def settings(self) -> dict:
        """The settings that determine the features (stored next to saved features)."""
        return {
            "model": str(self.backbone.name),
            "family": self.backbone.family,
            "features": self.names,
            "t": self.t,
            "resolution": self.resolution,
            "square": self.square,
            "seed": self.seed,
            "preset": self.preset.name if self.preset else None,
            "techniques": [tech.describe() for tech in self.techniques],
            "map_prompt": self.map_prompt,
        }

    # ------------------------------------------------------------------ core
    def _forward(self, images: Sequence[ImageInput], prompts: list[str]) -> dict[str, torch.Tensor]:
        rgb = [to_rgb(im) for im in images]
        if self.map_prompt is not None and any(i.is_map for i in self.infos):
            maps = [i for i in self.infos if i.is_map]
            rest = [i for i in self.infos if not i.is_map]
            with self.backbone.reusing_latents():  # both passes see the same images: encode them once
                out = self._run(rgb, [self.map_prompt] * len(rgb), maps)
                if rest:
                    out.update(self._run(rgb, prompts, rest))
            return {i.name: out[i.name] for i in self.infos}
        return self._run(rgb, prompts, self.infos)

    def _technique_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts after every technique's rewriting (templates, quality words, per-image captions).

        Applied to the whole image list before it is cut into batches, so per-image captions stay aligned
        with their images whatever the batch size or grouping."""
        for tech in self.techniques:
            prompts = tech.prompts(list(prompts))
        return list(prompts)

    def _run(self, rgb, prompts: list[str], infos: list[ActivationInfo]) -> dict[str, torch.Tensor]:
        """One forward with every technique applied (prompts already rewritten); ``infos`` as ``[B, C, H, W]``."""
        with contextlib.ExitStack() as stack:
            for tech in self.techniques:
                stack.enter_context(tech.active(self.backbone))
            inputs = self.backbone.prepare(rgb, prompts, self.t, self.seed, self.resolution, self.square)
            for tech in self.techniques:
                inputs = tech.prepare(self.backbone, inputs, rgb)
            with Capture(self.backbone, infos, inputs, early_exit=self.early_exit, map_reducer=head_mean) as cap:
                self.backbone.denoise(inputs)
        missing = cap.missing
        if missing:
            raise RuntimeError(f"the forward did not produce {missing}; these modules never ran for this input")
        out = {}
        for info in infos:
            x = cap.activations[info.name]
            if info.is_map:  # [B, Q, K] head-mean -> [B, K, h, w]
                x = sequence_to_spatial(x, inputs.grid)
            out[info.name] = x.to(device=self.out_device, dtype=self.out_dtype)
        return out

    def extract_batch(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """One forward for images that resize to the same size: ``{name: [B, C, H, W]}`` (no batching or
        grouping; for data loaders that already form batches)."""
        return self._forward(list(images), self._technique_prompts(self._prompt_list(prompts, len(images))))

    @staticmethod
    def _prompt_list(prompts: str | Sequence[str | None] | None, n: int) -> list[str]:
        """One prompt per image. ``None`` (for all images, or for one) is no prompt: the empty string, the
        default, as when ``prompts`` is left out."""
        if prompts is None or isinstance(prompts, str):
            return [prompts or ""] * n
        if not isinstance(prompts, Sequence):
            raise InvalidPromptError(f"prompts must be a string, a list of strings (one per image) or None, got "
                                     f"{type(prompts).__name__} {prompts!r:.60}")
        prompts = ["" if p is None else p for p in prompts]
        if len(prompts) != n:
            raise InvalidPromptError(f"got {len(prompts)} prompts for {n} images; pass one prompt, or one per image")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise InvalidPromptError(f"prompts must be strings (or None for no prompt), got {type(bad[0]).__name__} {bad[0]!r:.60}")
        return prompts

    def __call__(self, images: ImageInput | Sequence[ImageInput], prompts: str | Sequence[str | None] | None = "") -> dict[str, torch.Tensor]:
        """Features of a batch of images that resize to the same size: ``{name: [B, C, H, W]}``. ``prompts``:
        one for all images or one per image; ``None`` (or a ``None`` entry) means no prompt, the empty string,
        as when it is left out."""
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        if not images:
            raise InvalidImageError("no images given")
        prompt_list = self._technique_prompts(self._prompt_list(prompts, len(images)))
        rgb = [to_rgb(im) for im in images]
        sizes = {target_size(im.size, self.resolution, self.backbone.size_multiple, self.square) for im in rgb}
        if len(sizes) > 1:
            raise InvalidImageError(
                f"these images resize to different sizes {sorted(sizes)} and cannot share one tensor; use "
                "square=True, or iterate with FeatureExtractor.iter_items() (one result per image)"
            )
        parts = [
            self._forward(rgb[i : i + self.batch_size], prompt_list[i : i + self.batch_size])
            for i in range(0, len(rgb), self.batch_size)
        ]
        return {name: torch.cat([p[name] for p in parts]) for name in self.names}

    extract = __call__

    def iter_items(
        self, images: Sequence[ImageInput], prompts: str | Sequence[str | None] | None = "", progress: bool = False
    ) -> Iterator[ExtractedItem]:
        """Per-image results for images of any sizes: batches are formed from images that resize alike."""
        images = list(images)
        prompt_list = self._technique_prompts(self._prompt_list(prompts, len(images)))
        groups: dict[tuple[int, int], list[int]] = {}
        rgb = {}
        for i, im in enumerate(images):
            rgb[i] = to_rgb(im)
            groups.setdefault(target_size(rgb[i].size, self.resolution, self.backbone.size_multiple, self.square), []).append(i)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images), desc="extract", unit="img", disable=not progress)
        try:
            for size, idxs in groups.items():
                for s in range(0, len(idxs), self.batch_size):
                    chunk = idxs[s : s + self.batch_size]
                    feats = self._forward([rgb[i] for i in chunk], [prompt_list[i] for i in chunk])
                    for j, i in enumerate(chunk):
                        yield ExtractedItem(i, {k: v[j] for k, v in feats.items()}, prompt_list[i], (size[1], size[0]))
                    bar.update(len(chunk))
        finally:
            bar.close()
