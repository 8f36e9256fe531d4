"""LongCat-Image (diffusers ``LongCatImagePipeline``): Qwen2.5-VL text states of the bare prompt (the chat
template's prefix and suffix dropped), padded to a fixed 512 tokens and not masked in the denoiser; the FLUX
VAE, latents packed 2x2; FLUX-style double-stream then single-stream blocks over ``[text, image]``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DenoiserInputs, TextSegment
from .diffusers_compat import longcat_pos_ids
from .dit import FluxBackbone, PackedLatentTransformer
from .layout import TokenLayout
from .registry import register_backbone

__all__ = ["LongCatImageBackbone"]


@register_backbone("LongCatImagePipeline")
class LongCatImageBackbone(PackedLatentTransformer):
    """LongCat-Image: text tokens first in the joint sequence, ``tokenizer_max_length`` of them (the pipeline's
    fixed padding), so every prompt gives maps of one width."""

    family: ClassVar[str] = "longcatimage"
    hook_table: ClassVar[str] = "longcatimage"
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first")
    #: text tokens the denoiser sees; None: the pipeline's ``tokenizer_max_length`` (512, as trained)
    max_sequence_length: int | None = None

    @property
    def text_length(self) -> int:
        return int(self.max_sequence_length or self.pipeline.tokenizer_max_length)

    def text_segments(self) -> list:
        """The bare prompt (the template's tokens are dropped) from position 0."""
        return [TextSegment(self.pipeline.tokenizer, 0, self.text_length)]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """The pipeline's encoding at :attr:`text_length` tokens (its ``tokenizer_max_length`` for the call)."""
        pipe = self.pipeline
        before, pipe.tokenizer_max_length = pipe.tokenizer_max_length, self.text_length
        try:
            embeds, text_ids = pipe.encode_prompt(prompt=list(prompts))
        finally:
            pipe.tokenizer_max_length = before
        return {"encoder_hidden_states": embeds.to(self.dtype), "txt_ids": text_ids}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, _, h, w = noisy_latents.shape
        gh, gw = h // 2, w // 2
        dev = noisy_latents.device
        n = self.text_length  # image positions start after the text's, as the pipeline places them
        img_ids = longcat_pos_ids(modality_id=1, type="image", start=(n, n), height=gh, width=gw).to(dev)
        kwargs = {
            "hidden_states": FluxBackbone.pack(noisy_latents),
            "timestep": torch.full((b,), float(t) / 1000.0, dtype=self.dtype, device=dev),
            "img_ids": img_ids,
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((gh, gw), cond), t, image_size)
