"""Transformer families: PixArt-alpha/Sigma (DiT with cross-attention), SD3 and FLUX (MMDiT, joint attention,
flow matching)."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from .base import Backbone, DenoiserInputs, PatchedLatents, TextSegment
from .layout import TokenLayout
from .diffusers_compat import prepare_attention_mask
from .registry import register_backbone
from .unet import _DDPMNoising

__all__ = ["PixArtBackbone", "SD3Backbone", "PackedLatentTransformer", "FluxBackbone", "ChromaBackbone"]


def _default_max_length(backbone: Backbone) -> int:
    """The T5 sequence length the pipeline's ``encode_prompt`` uses (unless the adapter overrides it)."""
    if backbone.max_sequence_length:
        return int(backbone.max_sequence_length)
    return int(inspect.signature(backbone.pipeline.encode_prompt).parameters["max_sequence_length"].default)


class _FlowMatchNoising:
    """Rectified-flow noising: ``x_t = (1 - s) x_0 + s * noise`` with ``s = t / 1000`` (no sampling shift)."""

    def add_noise(self, latents: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        s = float(t) / 1000.0
        return (1.0 - s) * latents + s * noise


@register_backbone("PixArtAlphaPipeline", "PixArtSigmaPipeline")
class PixArtBackbone(PatchedLatents, _DDPMNoising, Backbone):
    """PixArt-alpha / -Sigma: T5 text, DiT blocks with self- and cross-attention (attn1 / attn2)."""

    family: ClassVar[str] = "pixart"
    hook_table: ClassVar[str] = "pixart"
    denoiser_attr: ClassVar[str] = "transformer"
    #: T5 sequence length used for prompts (PixArt-alpha was trained with 120, Sigma with 300)
    max_sequence_length: int | None = None

    def text_segments(self) -> list:
        return [TextSegment(self.pipeline.tokenizer, 0, _default_max_length(self))]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        extra = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device, **extra
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b = noisy_latents.shape[0]
        p = self.denoiser.config.patch_size
        dev = noisy_latents.device
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser, "use_additional_conditions", False):
            h, w = image_size
            added = {
                "resolution": torch.tensor([[h, w]], dtype=self.dtype, device=dev).repeat(b, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=self.dtype, device=dev).repeat(b, 1),
            }
        kwargs = {
            "hidden_states": noisy_latents,
            "timestep": torch.full((b,), int(t), dtype=torch.long, device=dev),
            "added_cond_kwargs": added,
            **cond,
        }
        grid = (noisy_latents.shape[-2] // p, noisy_latents.shape[-1] // p)
        return DenoiserInputs(kwargs, self.layout(grid, cond), t, image_size)


@register_backbone("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
class SD3Backbone(PatchedLatents, _FlowMatchNoising, Backbone):
    """Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G + T5, MMDiT joint attention (image tokens first)."""

    family: ClassVar[str] = "sd3"
    hook_table: ClassVar[str] = "sd3"
    denoiser_attr: ClassVar[str] = "transformer"
    default_segment_t: ClassVar[int] = 100
    max_sequence_length: int | None = None

    def text_segments(self) -> list:
        """CLIP tokens (77) first, then T5 tokens (when the T5 encoder is loaded)."""
        clip = self.pipeline.tokenizer
        segments = [TextSegment(clip, 0, clip.model_max_length)]
        if getattr(self.pipeline, "text_encoder_3", None) is not None:
            segments.append(TextSegment(self.pipeline.tokenizer_3, clip.model_max_length, _default_max_length(self)))
        return segments

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        extra = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False, **extra
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b = noisy_latents.shape[0]
        p = self.denoiser.config.patch_size
        kwargs = {
            "hidden_states": noisy_latents,
            "timestep": torch.full((b,), float(t), dtype=self.dtype, device=noisy_latents.device),
            **cond,
        }
        grid = (noisy_latents.shape[-2] // p, noisy_latents.shape[-1] // p)
        return DenoiserInputs(kwargs, self.layout(grid, cond), t, image_size)


class PackedLatentTransformer(_FlowMatchNoising, Backbone):
    """Flow-matching transformers over 2x2 patches of the VAE latents (FLUX.1, FLUX.2, Chroma, Qwen-Image): the
    native size comes from the pipeline's ``default_sample_size``; guidance-distilled checkpoints
    (``guidance_embeds``) get :attr:`guidance` as an input."""

    denoiser_attr: ClassVar[str] = "transformer"
    default_segment_t: ClassVar[int] = 150
    #: guidance value for guidance-distilled checkpoints (FLUX.1-dev); ignored when the model has none
    guidance: float = 3.5
    max_sequence_length: int | None = None

    @property
    def native_resolution(self) -> int:
        return int(getattr(self.pipeline, "default_sample_size", 128)) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2

    def guidance_kwargs(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``{"guidance": [B]}`` for guidance-distilled models, else nothing."""
        if not getattr(self.denoiser.config, "guidance_embeds", False):
            return {}
        return {"guidance": torch.full((batch,), float(self.guidance), dtype=torch.float32, device=device)}


@register_backbone("FluxPipeline", "FluxImg2ImgPipeline", "FluxControlNetPipeline")
class FluxBackbone(PackedLatentTransformer):
    """FLUX.1: CLIP + T5, 2x2-packed latents, double-stream (text, image) then single-stream blocks over the
    joint sequence, text tokens first."""

    family: ClassVar[str] = "flux"
    hook_table: ClassVar[str] = "flux"
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first")

    def text_segments(self) -> list:
        """FLUX attends to T5 tokens only (CLIP gives the pooled vector)."""
        return [TextSegment(self.pipeline.tokenizer_2, 0, _default_max_length(self))]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        extra = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        embeds, pooled, text_ids = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=self.device, **extra)
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype), "txt_ids": text_ids}

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``: FLUX's 2x2 patch sequence, row-major."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def image_ids(gh: int, gw: int, device, dtype) -> torch.Tensor:
        """Positional ids ``[gh*gw, 3]`` = (0, row, col) of each packed token."""
        ids = torch.zeros(gh, gw, 3)
        ids[..., 1] = torch.arange(gh)[:, None]
        ids[..., 2] = torch.arange(gw)[None, :]
        return ids.reshape(gh * gw, 3).to(device=device, dtype=dtype)

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, _, h, w = noisy_latents.shape
        gh, gw = h // 2, w // 2
        dev = noisy_latents.device
        kwargs = {
            "hidden_states": self.pack(noisy_latents),
            "timestep": torch.full((b,), float(t) / 1000.0, dtype=self.dtype, device=dev),
            "img_ids": self.image_ids(gh, gw, dev, self.dtype),
            **cond,
            **self.guidance_kwargs(b, dev),
        }
        return DenoiserInputs(kwargs, self.layout((gh, gw), cond), t, image_size)


@register_backbone("ChromaPipeline", "ChromaImg2ImgPipeline")
class ChromaBackbone(FluxBackbone):
    """Chroma: FLUX.1-schnell's architecture de-distilled, T5 only (no pooled CLIP vector, no guidance input),
    the prompt's padding masked in joint attention."""

    family: ClassVar[str] = "chroma"
    hook_table: ClassVar[str] = "chroma"

    def text_segments(self) -> list:
        return [TextSegment(self.pipeline.tokenizer, 0, _default_max_length(self))]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        extra = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        embeds, text_ids, mask, *_ = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, do_classifier_free_guidance=False, **extra
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "txt_ids": text_ids, "text_mask": mask}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        cond = dict(cond)
        text_mask = cond.pop("text_mask")
        inputs = super().denoiser_inputs(noisy_latents, t, cond, image_size)
        b, n_image = noisy_latents.shape[0], inputs.grid[0] * inputs.grid[1]
        inputs.kwargs["attention_mask"] = prepare_attention_mask(self.pipeline, b, n_image, self.dtype, text_mask)
        return inputs
