"""Content-shift suppression techniques as composable extraction options.

A technique may rewrite the prompts, alter the denoiser inputs (ControlNet residuals, a multi-step start),
and/or hold the model in a modified state for the forward (LoRA). They compose: a FeatureExtractor applies
its techniques in order, e.g. ``[Prompt(quality="natural"), ControlNet("lllyasviel/sd-controlnet-canny")]``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DifffeatError


#: quality-word presets (appended to prompts). "natural" is the paper's text for natural images; it hurts
#: where "quality" changes meaning (e.g. bedrooms), so it is opt-in. "correspondence" and "label-scarce" are
#: the words the reference code (Darkbblue/diffusion-content-shift) appends for SPair-71k and Horse-21.
QUALITY_WORDS = {
    "natural": "high quality, best quality, highly realistic",
    "detailed": "highly detailed, sharp focus",
    "correspondence": "high quality, best quality, highly realistic, masterpiece, high resolution",
    "label-scarce": "high quality, best quality, highly realistic, masterpiece",
}

#: whole prompts the reference code uses per task/dataset (they replace every image's prompt)
TASK_PROMPTS = {
    "spair": "a photo of aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, dog, horse, motorbike, "
    "person, potted plant, sheep, train, tv monitor, " + QUALITY_WORDS["correspondence"],
    "horse21": "a horse, " + QUALITY_WORDS["label-scarce"],
    "bedroom28": "a photo of a tidy and well-designed bedroom",
    "ade20k": "a highly realistic photo of the real world. It can be an indoor scene, or an outdoor scene, or a "
    "photo of nature. high quality.",
    "cityscapes": "An urban street scene with multiple lanes, various buildings, traffic lights, cars in the lanes, "
    "and pedestrians, highly realistic.",
}


class Technique:
    """Base class: every hook is optional."""

    name = "technique"

    def prompts(self, prompts: list[str]) -> list[str]:
        return prompts

    def prepare(self, backbone: Any, inputs: Any, images: Sequence[Image.Image]) -> Any:
        return inputs

    @contextlib.contextmanager
    def active(self, backbone: Any) -> Iterator[None]:
        yield

    def describe(self) -> dict[str, Any]:
        return {"technique": self.name}


@dataclass
class Prompt(Technique):
    """Fine-grained prompts. ``template`` formats each prompt ("a photo of {}"), ``quality`` appends a
    quality-word preset (see :data:`QUALITY_WORDS`) or literal words, ``captions`` replaces the prompts by
    per-image captions (same order as the images), ``task`` replaces every prompt by the reference code's
    prompt for that task (see :data:`TASK_PROMPTS`)."""

    template: str | None = None
    quality: str | None = None
    captions: Sequence[str] | None = None
    task: str | None = None
    name: str = "prompt"

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASK_PROMPTS:
            raise DifffeatError(f"unknown prompt task {self.task!r}; the reference's tasks are {', '.join(TASK_PROMPTS)}")
        if self.task is not None and self.captions is not None:
            raise DifffeatError("give either per-image captions or a task prompt, not both")

    def prompts(self, prompts: list[str]) -> list[str]:
        out = list(self.captions) if self.captions is not None else list(prompts)
        if self.task is not None:
            out = [TASK_PROMPTS[self.task]] * len(prompts)
        if len(out) != len(prompts):
            raise DifffeatError(f"{len(out)} captions for {len(prompts)} images; give one caption per image")
        if self.template:
            if "{}" not in self.template:
                raise DifffeatError(f"prompt template {self.template!r} needs a '{{}}' placeholder")
            out = [self.template.format(p) for p in out]
        if self.quality:
            words = QUALITY_WORDS.get(self.quality, self.quality)
            out = [f"{p}, {words}" if p else words for p in out]
        return out

    def describe(self) -> dict[str, Any]:
        return {"technique": self.name, "template": self.template, "quality": self.quality, "task": self.task,
                "captions": self.captions is not None}


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (OpenCV) of an image as a 3-channel control image, white edges on black.

    Runs on the RGB array as the reference code does: OpenCV's Canny takes, per pixel, the gradient of the
    channel where it is strongest, so an edge between two colours of equal grey level is kept (on greyscale
    it would vanish)."""
    import cv2

    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image.convert("RGB"))), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


@dataclass
class ControlNet(Technique):
    """ControlNet conditioned on the input image's own Canny edges (paper: thresholds 100/200, scale 1).

    Args:
        model: a diffusers ``ControlNetModel`` or a hub id / local folder of one.
        low, high: Canny thresholds. scale: conditioning scale (0 = no effect).
        start_t: multi-step start: noise to ``start_t``, denoise with ControlNet down to the extraction
            timestep in ``steps`` DDIM steps, then extract (the paper: ~10 steps more at most).
        start: ``"published"`` for the reference code's multi-step start, relative to the extraction timestep
            t: noise to t + n and take n one-timestep DDIM steps (n = :data:`PUBLISHED_START_STEPS` of the
            family: 11 for SD1.5, i.e. 61 -> 50, and 10 for SDXL); overrides ``start_t`` and ``steps``.
    """

    model: Any
    low: int = 100
    high: int = 200
    scale: float = 1.0
    start_t: int | None = None
    steps: int = 1
    start: str | None = None
    name: str = "controlnet"
    _net: Any = field(default=None, repr=False)

    def _controlnet(self, backbone: Any):
        if self._net is None:
            from diffusers import ControlNetModel

            if isinstance(self.model, (str, os.PathLike)):
                try:
                    self._net = ControlNetModel.from_pretrained(self.model, torch_dtype=backbone.dtype)
                except Exception as exc:
                    raise DifffeatError(f"could not load ControlNet {self.model!r}: {str(exc).splitlines()[0]}") from None
            else:
                self._net = self.model
            self._net.to(device=backbone.device, dtype=backbone.dtype)
        if backbone.family not in ("sd", "sdxl"):
            raise DifffeatError(f"ControlNet techniques support UNet families (sd, sdxl), not {backbone.family!r}")
        unet_cfg, cn_cfg = backbone.denoiser.config, self._net.config
        if cn_cfg.cross_attention_dim != unet_cfg.cross_attention_dim or tuple(cn_cfg.block_out_channels) != tuple(unet_cfg.block_out_channels):
            raise DifffeatError(
                "this ControlNet was made for a different model family (cross-attention dim "
                f"{cn_cfg.cross_attention_dim} / channels {tuple(cn_cfg.block_out_channels)} vs the UNet's "
                f"{unet_cfg.cross_attention_dim} / {tuple(unet_cfg.block_out_channels)}); use a ControlNet trained for this base model"
            )
        return self._net

    def _residuals(self, backbone: Any, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict, cond: torch.Tensor) -> dict:
        net = self._controlnet(backbone)
        extra = {"added_cond_kwargs": kwargs["added_cond_kwargs"]} if "added_cond_kwargs" in kwargs else {}
        down, mid = net(sample, timestep, encoder_hidden_states=kwargs["encoder_hidden_states"], controlnet_cond=cond,
                        conditioning_scale=float(self.scale), return_dict=False, **extra)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def prepare(self, backbone: Any, inputs: Any, images: Sequence[Image.Image]) -> Any:
        h, w = inputs.image_size
        edges = [canny_edges(im.resize((w, h)), self.low, self.high) for im in images]
        cond = torch.from_numpy(np.stack([np.asarray(e, dtype=np.float32) / 255.0 for e in edges])).permute(0, 3, 1, 2)
        cond = cond.to(device=backbone.device, dtype=backbone.dtype)
        kwargs = dict(inputs.kwargs)
        start_t, steps = self._start(backbone, int(inputs.timestep))
        with torch.no_grad():
            if start_t is not None:
                kwargs["sample"] = self._multi_step(backbone, inputs, kwargs, cond, start_t, steps)
            kwargs.update(self._residuals(backbone, kwargs["sample"], kwargs["timestep"], kwargs, cond))
        inputs.kwargs = kwargs
        return inputs

    def _start(self, backbone: Any, t: int) -> tuple[int | None, int]:
        """``(start_t, steps)`` of the multi-step start (None: extract right after noising)."""
        if self.start is None:
            return self.start_t, self.steps
        if self.start != "published":
            raise DifffeatError(f"controlnet start={self.start!r}: the only named start is 'published'")
        n = PUBLISHED_START_STEPS.get(backbone.family)
        if n is None:
            raise DifffeatError(f"the reference has no multi-step start for the {backbone.family!r} family "
                                f"(only {', '.join(PUBLISHED_START_STEPS)}); give start_t=T,steps=N instead")
        if t + n > 999:
            raise DifffeatError(f"the published start noises to t + {n} = {t + n}, beyond 999; extract at t <= {999 - n}")
        return t + n, n

    def _multi_step(self, backbone: Any, inputs: Any, kwargs: dict, cond: torch.Tensor, start_t: int | None = None,
                    steps: int | None = None) -> torch.Tensor:
        """Noise to ``start_t`` and run ``steps`` DDIM steps (UNet + ControlNet) down to the extraction t.

        Each step is the DDIM scheduler's own ``step`` (eta 0), built from the model's scheduler config, so the
        denoiser output is read with the model's ``prediction_type`` (epsilon, v-prediction or sample)."""
        from diffusers import DDIMScheduler

        start_t = self.start_t if start_t is None else start_t
        n_steps = self.steps if steps is None else steps
        t_end, t_start = int(inputs.timestep), int(start_t)
        if t_start <= t_end or n_steps < 1 or (t_start - t_end) % n_steps:
            raise DifffeatError(f"start_t={t_start} must exceed t={t_end} by a multiple of steps={n_steps}")
        if inputs.latents is None or inputs.noise is None:
            raise DifffeatError("the multi-step start needs the clean latents; prepare inputs with Backbone.prepare")
        stride = (t_start - t_end) // n_steps
        sched = DDIMScheduler.from_config(backbone.pipeline.scheduler.config)
        n_train = int(sched.config.num_train_timesteps)
        sched.set_timesteps(max(1, n_train // stride))
        if n_train // sched.num_inference_steps != stride:  # DDIM's step goes back num_train // num_inference
            raise DifffeatError(f"a multi-step stride of {stride} timesteps is not a DDIM step size for {n_train} "
                                "training timesteps; choose start_t and steps so that (start_t - t) / steps divides it")
        sample = backbone.add_noise(inputs.latents, t_start, inputs.noise)
        b = sample.shape[0]
        for i in range(n_steps):
            t_cur = t_start - i * stride
            ts = torch.full((b,), t_cur, dtype=torch.long, device=sample.device)
            step_kwargs = {**kwargs, "sample": sample, "timestep": ts}
            step_kwargs.update(self._residuals(backbone, sample, ts, kwargs, cond))
            prediction = backbone.denoiser(**step_kwargs, return_dict=False)[0]
            sample = sched.step(prediction, t_cur, sample, eta=0.0, return_dict=False)[0]
        return sample

    def describe(self) -> dict[str, Any]:
        return {"technique": self.name, "model": str(self.model) if isinstance(self.model, (str, os.PathLike)) else type(self.model).__name__,
                "low": self.low, "high": self.high, "scale": self.scale, "start_t": self.start_t, "steps": self.steps, "start": self.start}


@dataclass
class Lora(Technique):
    """A LoRA (file, folder or hub id) loaded through diffusers' LoRA loading for the forward, then removed.
    The paper fits one on ~30 images of the target domain (rank 64, alpha 32)."""

    weights: str | os.PathLike
    scale: float = 1.0
    weight_name: str | None = None
    name: str = "lora"

    def __post_init__(self) -> None:
        path = os.fspath(self.weights)
        looks_local = path.startswith((".", "/", "~")) or path.endswith((".safetensors", ".bin", ".pt", ".ckpt")) \
            or path.count("/") != 1
        if looks_local and not os.path.exists(os.path.expanduser(path)):
            raise DifffeatError(f"LoRA file not found: {path!r}; pass a LoRA .safetensors file, its folder, or a hub "
                                "id (user/repo)")

    @contextlib.contextmanager
    def active(self, backbone: Any) -> Iterator[None]:
        pipe = backbone.pipeline
        adapter = "difffeat_lora"
        had_adapters = bool(getattr(pipe, "get_list_adapters", dict)())
        kwargs = {"weight_name": self.weight_name} if self.weight_name else {}
        path = os.fspath(self.weights)
        if os.path.isfile(path):
            kwargs["weight_name"] = os.path.basename(path)
            path = os.path.dirname(path) or "."
        try:
            pipe.load_lora_weights(path, adapter_name=adapter, **kwargs)
        except Exception as exc:
            with contextlib.suppress(Exception):
                pipe.delete_adapters(adapter)
            if not had_adapters:
                with contextlib.suppress(Exception):
                    pipe.unload_lora_weights()
            raise DifffeatError(
                f"could not load LoRA {os.fspath(self.weights)!r} into this {backbone.family} model "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}); is it a LoRA for this base model?"
            ) from None
        try:
            pipe.set_adapters([adapter], adapter_weights=[float(self.scale)])
            yield
        finally:
            pipe.delete_adapters(adapter)
            if not had_adapters:  # remove the PEFT wrapper layers too: the model is exactly as before
                pipe.unload_lora_weights()

    def describe(self) -> dict[str, Any]:
        return {"technique": self.name, "weights": os.fspath(self.weights), "scale": self.scale}


#: one-timestep DDIM steps of the reference's multi-step start per family (SD1.5: 61 -> 50; SDXL: 60 -> 50)
PUBLISHED_START_STEPS = {"sd": 11, "sdxl": 10}

TECHNIQUES = {"prompt": Prompt, "controlnet": ControlNet, "lora": Lora}


def parse_technique(spec: str) -> Technique:
    """CLI form: ``prompt:quality=natural``, ``prompt:template=a photo of {}``, ``prompt:task=ade20k``, ``controlnet:MODEL[,scale=1][,start_t=60,steps=2 | ,start=published]``,
    ``lora:PATH[,scale=0.8]``."""
    kind, _, rest = spec.partition(":")
    if kind not in TECHNIQUES:
        raise DifffeatError(f"unknown technique {kind!r}; choose one of {', '.join(TECHNIQUES)} (e.g. controlnet:MODEL_ID, lora:PATH, prompt:quality=natural)")
    parts = [p for p in rest.split(",") if p] if kind != "prompt" else ([rest] if rest else [])
    positional = [p for p in parts if "=" not in p]
    options = dict(p.split("=", 1) for p in parts if "=" in p)
    ints = {"low", "high", "start_t", "steps"}
    floats = {"scale"}
    try:
        typed = {k: int(v) if k in ints else float(v) if k in floats else v for k, v in options.items()}
    except ValueError as exc:
        raise DifffeatError(f"bad option value in {spec!r}: {exc}") from None
    try:
        if kind == "prompt":
            return Prompt(**typed)
        if not positional:
            raise DifffeatError(f"{kind} needs a model: {kind}:ID_OR_PATH")
        return TECHNIQUES[kind](positional[0], **typed)
    except TypeError as exc:
        raise DifffeatError(f"bad options for {kind}: {exc}") from None
