"""Ovis-Image (diffusers ``OvisImagePipeline``): Qwen3 text states of the prompt behind a fixed instruction in
Qwen's chat template (the tokens before the prompt dropped), padded to ``max_sequence_length`` (256) zeroed
states that the denoiser attends to; the FLUX VAE, latents packed 2x2; FLUX-style double-stream then
single-stream blocks over ``[text, image]``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DenoiserInputs, TextSegment
from .dit import FluxBackbone, PackedLatentTransformer
from .layout import TokenLayout
from .registry import register_backbone

__all__ = ["OvisImageBackbone"]

_SLOT = "\x00PROMPT\x00"


@register_backbone("OvisImagePipeline")
class OvisImageBackbone(PackedLatentTransformer):
    """Ovis-Image: text tokens first in the joint sequence, always ``max_sequence_length`` of them."""

    family: ClassVar[str] = "ovisimage"
    hook_table: ClassVar[str] = "ovisimage"
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first")
    #: text tokens the denoiser sees; None: the pipeline's default (256)
    max_sequence_length: int | None = None

    def _text_length(self) -> int:
        return int(self.max_sequence_length or 256)

    def text_segments(self) -> list:
        """The prompt follows the pipeline's instruction inside the chat template; the pipeline drops the first
        ``user_prompt_begin_id`` tokens (the template's start and the instruction)."""
        pipe = self.pipeline
        text = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": pipe.system_prompt + _SLOT}], tokenize=False, add_generation_prompt=True,
            enable_thinking=False,
        )  # fmt: skip
        prefix, _, suffix = text.partition(_SLOT)
        return [TextSegment(pipe.tokenizer, 0, self._text_length(), prefix + "{}" + suffix, int(pipe.user_prompt_begin_id))]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        embeds, _, text_ids, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self._text_length(),
        )  # fmt: skip
        return {"encoder_hidden_states": embeds.to(self.dtype), "txt_ids": text_ids}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, _, h, w = noisy_latents.shape
        gh, gw = h // 2, w // 2
        dev = noisy_latents.device
        kwargs = {
            "hidden_states": FluxBackbone.pack(noisy_latents),
            "timestep": torch.full((b,), float(t) / 1000.0, dtype=self.dtype, device=dev),
            "img_ids": FluxBackbone.image_ids(gh, gw, dev, self.dtype),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((gh, gw), cond), t, image_size)
