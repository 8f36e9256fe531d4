"""FLUX.2 (diffusers ``Flux2Pipeline`` with Mistral-3, ``Flux2KleinPipeline`` with Qwen3): 32-channel VAE
latents patchified 2x2 and batch-norm normalised, one token per patch, 4-axis positions (T, H, W, L),
double-stream then single-stream blocks, flow matching."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import UnsupportedBackboneError
from .base import DenoiserInputs
from .diffusers_compat import pack_latents, patchify_latents, prepare_latent_ids
from .dit import PackedLatentTransformer
from .layout import TokenLayout
from .registry import register_backbone
from .text import chat_template_segment

__all__ = ["Flux2Backbone"]


@register_backbone("Flux2Pipeline", "Flux2KleinPipeline")
class Flux2Backbone(PackedLatentTransformer):
    """FLUX.2: LLM text states (three hidden layers stacked), text tokens first in every joint sequence."""

    family: ClassVar[str] = "flux2"
    hook_table: ClassVar[str] = "flux2"
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first")
    guidance: float = 4.0

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * 2
        return int(self.pipeline.vae.config.latent_channels) * 4, height // f, width // f

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> patchified, batch-norm-normalised latents ``[B, 4C, H/16, W/16]`` (the
        pipeline's own image-conditioning encoding)."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        latents = patchify_latents(self.pipeline, latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return (latents - mean) / std

    def text_segments(self) -> list:
        if type(self.pipeline).__name__ != "Flux2KleinPipeline":
            raise UnsupportedBackboneError(
                "segmentation needs the prompt's token positions, which difffeat finds for FLUX.2 [klein] (Qwen3 "
                "chat template) but not yet for FLUX.2 [dev]'s Mistral-3 processor; features and attention maps "
                "work with every FLUX.2 pipeline"
            )
        return [chat_template_segment(self.pipeline.tokenizer, self._max_length(), enable_thinking=False)]

    def _max_length(self) -> int:
        return int(self.max_sequence_length or 512)

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        embeds, text_ids = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self._max_length()
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "txt_ids": text_ids}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, _, gh, gw = noisy_latents.shape
        dev = noisy_latents.device
        kwargs = {
            "hidden_states": pack_latents(self.pipeline, noisy_latents),
            "timestep": torch.full((b,), float(t) / 1000.0, dtype=self.dtype, device=dev),
            "img_ids": prepare_latent_ids(self.pipeline, noisy_latents).to(dev),
            **cond,
            **self.guidance_kwargs(b, dev),
        }
        return DenoiserInputs(kwargs, self.layout((gh, gw), cond), t, image_size)
