"""CogView4 (diffusers ``CogView4Pipeline``): GLM-4 text states (its second-to-last layer) of the prompt padded
on the left, unmasked (the pipeline pads a batch to its longest prompt, rounded up to 16 tokens, and masks
nothing); a 16-channel VAE, 2x2 patches embedded by the denoiser; blocks of joint attention over
``[text, image]`` with SDXL-style size conditioning. Flow matching, timesteps on the 1000-step scale."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Backbone, DenoiserInputs, PatchedLatents, PipelineVaeScale, TextSegment
from .dit import _FlowMatchNoising
from .layout import TokenLayout
from .registry import register_backbone

__all__ = ["CogView4Backbone"]


@register_backbone("CogView4Pipeline")
class CogView4Backbone(PipelineVaeScale, PatchedLatents, _FlowMatchNoising, Backbone):
    """CogView4: text tokens first in every joint sequence, always :attr:`max_sequence_length` of them, the
    prompt right-aligned after padding tokens that the model attends to (as the pipeline feeds a batch whose
    longest prompt has that many tokens), so maps have one width and a batch equals its single runs. One prompt
    alone gets the pipeline's exact conditioning when ``max_sequence_length`` is its token count rounded up to 16."""

    family: ClassVar[str] = "cogview4"
    hook_table: ClassVar[str] = "cogview4"
    denoiser_attr: ClassVar[str] = "transformer"
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first")
    default_segment_t: ClassVar[int] = 150
    #: text tokens the denoiser sees (rounded up to 16, as the pipeline rounds); None: 128
    max_sequence_length: int | None = None

    def _text_length(self) -> int:
        n = int(self.max_sequence_length or 128)
        return -(-n // 16) * 16

    def text_segments(self) -> list:
        return [TextSegment(self.pipeline.tokenizer, 0, self._text_length(), pad_left=True)]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """GLM states of the prompts padded on the left to :attr:`max_sequence_length` tokens with the pad token
        (the pipeline's padding, to a fixed length), ``hidden_states[-2]`` as the pipeline takes them."""
        pipe = self.pipeline
        ids = pipe.tokenizer(
            list(prompts), padding="max_length", max_length=self._text_length(), truncation=True,
            add_special_tokens=True, return_tensors="pt", padding_side="left",
        ).input_ids  # fmt: skip
        states = pipe.text_encoder(ids.to(pipe.text_encoder.device), output_hidden_states=True).hidden_states[-2]
        return {"encoder_hidden_states": states.to(device=self.device, dtype=self.dtype)}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, _, h, w = noisy_latents.shape
        dev = noisy_latents.device
        p = int(self.denoiser.config.patch_size)
        size = torch.tensor([list(image_size)], dtype=self.dtype, device=dev).repeat(b, 1)
        kwargs = {
            "hidden_states": noisy_latents,
            "timestep": torch.full((b,), float(t), dtype=self.dtype, device=dev),
            "original_size": size,
            "target_size": size,
            "crop_coords": torch.zeros(b, 2, dtype=self.dtype, device=dev),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((h // p, w // p), cond), t, image_size)
