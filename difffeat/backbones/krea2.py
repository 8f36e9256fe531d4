"""Krea 2 (diffusers ``Krea2Pipeline``): a stack of Qwen3-VL hidden states per token (the Qwen-Image system
prompt dropped, the prompt padded to a fixed length and masked), fused by the denoiser's own text blocks; the
Qwen-Image VAE (latents normalised per channel) with 2x2 patches; single-stream blocks over ``[text, image]``
with grouped-query attention (the keys/values repeated to the query heads before the attention call)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DenoiserInputs, TextSegment
from .diffusers_compat import pack_latents
from .qwenimage import QwenImageBackbone
from .registry import register_backbone

__all__ = ["Krea2Backbone"]


@register_backbone("Krea2Pipeline")
class Krea2Backbone(QwenImageBackbone):
    """Krea 2: text tokens first in every block's sequence (the Qwen-Image adapter's text-first layout), always
    ``max_sequence_length`` of them (padding masked), so maps have one width and a batch equals its single runs."""

    family: ClassVar[str] = "krea2"
    hook_table: ClassVar[str] = "krea2"
    #: text tokens the denoiser sees; None: the pipeline's default (512)
    max_sequence_length: int | None = None

    def _text_length(self) -> int:
        return int(self.max_sequence_length or 512)

    @property
    def native_resolution(self) -> int:
        """1024 px, the pipeline's default size (it keeps no ``default_sample_size``), unless the pipeline sets one."""
        sample = getattr(self.pipeline, "default_sample_size", None)
        return int(sample) * self.vae_scale_factor if sample else 1024

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.pipeline.patch_size)

    def text_segments(self) -> list:
        """The prompt follows the system prefix, whose tokens the pipeline drops."""
        pipe = self.pipeline
        return [TextSegment(pipe.tokenizer, 0, self._text_length(), pipe.prompt_template_encode_prefix + "{}",
                            int(pipe.prompt_template_encode_start_idx))]  # fmt: skip

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """``[B, T, layers, D]`` tapped text states and their ``[B, T]`` validity mask, as the pipeline makes them."""
        embeds, mask = self.pipeline.encode_prompt(prompt=list(prompts), device=self.device, max_sequence_length=self._text_length())
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        pipe = self.pipeline
        b, c, h, w = noisy_latents.shape
        p = int(pipe.patch_size)
        dev = noisy_latents.device
        n_text = cond["encoder_hidden_states"].shape[1]
        kwargs = {
            "hidden_states": pack_latents(pipe, noisy_latents, b, c, h, w),
            "timestep": torch.full((b,), float(t) / 1000.0, dtype=self.dtype, device=dev),
            "position_ids": pipe.prepare_position_ids(n_text, h // p, w // p, dev),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((h // p, w // p), cond), t, image_size)
