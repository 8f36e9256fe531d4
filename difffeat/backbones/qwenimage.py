"""Qwen-Image (diffusers ``QwenImagePipeline``): Qwen2.5-VL text states (system prompt dropped), a causal video
VAE used on single frames, latents normalised per channel and packed 2x2, 60 double-stream MMDiT blocks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from .base import DenoiserInputs, PipelineVaeScale
from .diffusers_compat import pack_latents
from .dit import PackedLatentTransformer
from .layout import TokenLayout
from .probing import clearing_method_caches
from .registry import register_backbone

__all__ = ["QwenImageBackbone"]


@register_backbone("QwenImagePipeline", "QwenImageImg2ImgPipeline")
class QwenImageBackbone(PipelineVaeScale, PackedLatentTransformer):
    """Qwen-Image: text tokens first in the joint sequence; the prompt's padding is masked."""

    family: ClassVar[str] = "qwenimage"
    hook_table: ClassVar[str] = "qwenimage"
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first")
    guidance: float = 4.0
    #: text tokens the denoiser sees (the prompt after the dropped system prompt, padded and masked); None: 256
    max_sequence_length: int | None = None

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return int(self.pipeline.vae.config.z_dim), height // f, width // f

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.pipeline.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1).to(like)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1).to(like)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``(z - mean) / std`` of the one-frame video latents, ``[B, z_dim, H/f, W/f]``."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def text_segments(self) -> list:
        """The prompt sits in the pipeline's template; the system prompt's tokens are dropped before the
        denoiser sees the sequence."""
        from .base import TextSegment

        pipe = self.pipeline
        return [TextSegment(pipe.tokenizer, 0, self._text_length(), pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)]

    def _text_length(self) -> int:
        return int(self.max_sequence_length or 256)

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """Text states padded (masked) to ``max_sequence_length`` tokens, so every prompt gives maps of the same
        width and a batch equals its single runs; masked keys get zero attention, as in the pipeline's own
        batch padding."""
        n = self._text_length()
        embeds, mask = self.pipeline.encode_prompt(prompt=prompts, device=self.device, max_sequence_length=n)
        b, length, c = embeds.shape
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.long, device=embeds.device)
        pad = n - length
        embeds = torch.cat([embeds, embeds.new_zeros(b, pad, c)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(b, pad)], dim=1)
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_hidden_states_mask": mask}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, c, h, w = noisy_latents.shape
        dev = noisy_latents.device
        kwargs = {
            "hidden_states": pack_latents(self.pipeline, noisy_latents, b, c, h, w),
            "timestep": torch.full((b,), float(t) / 1000.0, dtype=self.dtype, device=dev),
            "img_shapes": [[(1, h // 2, w // 2)]] * b,
            **cond,
            **self.guidance_kwargs(b, dev),
        }
        return DenoiserInputs(kwargs, self.layout((h // 2, w // 2), cond), t, image_size)

    @contextmanager
    def probe_context(self) -> Iterator[None]:
        """The transformer caches its RoPE frequencies per grid size (``lru_cache``): a fake-tensor forward's
        are dropped afterwards, or the next real forward would find fake tensors there."""
        with clearing_method_caches(self.denoiser):
            yield
