"""UNet families: Stable Diffusion 1.x/2.x and SDXL (epsilon / v-prediction, DDPM noising)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import DDPMScheduler

from .base import Backbone, DenoiserInputs
from .registry import register_backbone

__all__ = ["StableDiffusionBackbone", "StableDiffusionXLBackbone"]


class _DDPMNoising:
    """Noise with the model's own training schedule (betas from its scheduler config)."""

    _ddpm: DDPMScheduler | None = None

    def add_noise(self, latents: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        if self._ddpm is None:
            self._ddpm = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        timesteps = torch.full((latents.shape[0],), int(t), dtype=torch.long, device=latents.device)
        return self._ddpm.add_noise(latents, noise, timesteps)


class _UNetGeometry:
    @property
    def size_multiple(self) -> int:
        n_down = len(self.pipeline.unet.config.down_block_types)
        return self.vae_scale_factor * 2 ** (n_down - 1)

    def _grid(self, latents: torch.Tensor) -> tuple[int, int]:
        return int(latents.shape[-2]), int(latents.shape[-1])


@register_backbone(
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
)
class StableDiffusionBackbone(_DDPMNoising, _UNetGeometry, Backbone):
    """Stable Diffusion 1.x / 2.x (and the embedded ``shapes`` model): CLIP text, UNet with cross-attention."""

    family: ClassVar[str] = "sd"
    hook_table: ClassVar[str] = "unet"
    denoiser_attr: ClassVar[str] = "unet"

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b = noisy_latents.shape[0]
        timestep = torch.full((b,), int(t), dtype=torch.long, device=noisy_latents.device)
        kwargs = {"sample": noisy_latents, "timestep": timestep, **cond}
        return DenoiserInputs(kwargs, self.layout(self._grid(noisy_latents), cond), t, image_size)


@register_backbone("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLControlNetPipeline")
class StableDiffusionXLBackbone(_DDPMNoising, _UNetGeometry, Backbone):
    """SDXL: two CLIP encoders, pooled text embeddings and size/crop time ids as added conditions."""

    family: ClassVar[str] = "sdxl"
    hook_table: ClassVar[str] = "unet"
    denoiser_attr: ClassVar[str] = "unet"

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "text_embeds": pooled.to(self.dtype)}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b = noisy_latents.shape[0]
        h, w = image_size
        # original size, crop top-left, target size: the image is used as is (no crop)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=noisy_latents.device).repeat(b, 1)
        timestep = torch.full((b,), int(t), dtype=torch.long, device=noisy_latents.device)
        kwargs = {
            "sample": noisy_latents,
            "timestep": timestep,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": time_ids},
        }
        return DenoiserInputs(kwargs, self.layout(self._grid(noisy_latents), cond), t, image_size)
