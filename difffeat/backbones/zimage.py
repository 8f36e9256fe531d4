"""Z-Image (diffusers ``ZImagePipeline``): Qwen3 text states (the prompt in Qwen's chat template, padding
dropped), the FLUX VAE, a single-stream DiT: 2 image-only refiner blocks, 2 text-only refiner blocks, then
blocks over the joint sequence ``[image, image padding, text, text padding]``, each block padded to a
multiple of 32 tokens. Flow matching; the denoiser takes ``1 - t/1000``."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from .base import DenoiserInputs
from .dit import PackedLatentTransformer
from .layout import TokenLayout, padded_length
from .registry import register_backbone
from .text import chat_template_segment

__all__ = ["ZImageBackbone"]


@register_backbone("ZImagePipeline", "ZImageImg2ImgPipeline")
class ZImageBackbone(PackedLatentTransformer):
    """Z-Image: image tokens first in every joint sequence. The text block is as long as the prompt (rounded
    up to 32 tokens), so cross maps are padded to :attr:`text_width` columns of zero probability."""

    family: ClassVar[str] = "zimage"
    hook_table: ClassVar[str] = "zimage"
    #: every block of a sequence (image, text) padded to a multiple of 32 tokens, the image block first
    token_layout: ClassVar[TokenLayout] = TokenLayout("image-first", block_multiple=32)
    #: text tokens the pipeline keeps at most (its ``max_sequence_length``); None: 512
    max_sequence_length: int | None = None

    def _max_length(self) -> int:
        return int(self.max_sequence_length or 512)

    @property
    def text_width(self) -> int:
        """Columns of every cross map: the longest text block the denoiser can see."""
        return padded_length(self._max_length(), self.token_layout.block_multiple)

    def text_segments(self) -> list:
        return [chat_template_segment(self.pipeline.tokenizer, self._max_length(), enable_thinking=True)]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """``{"cap_feats": [[T_i, C], ...]}``: each prompt's states without padding, as the pipeline feeds them."""
        embeds, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self._max_length(),
        )  # fmt: skip  (a copy: the pipeline writes the templated prompts into the list it gets)
        return {"cap_feats": [e.to(self.dtype) for e in embeds]}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, _, h, w = noisy_latents.shape
        kwargs = {
            "x": list(noisy_latents.unsqueeze(2).unbind(0)),  # one [C, 1, H, W] frame per image
            "t": torch.full((b,), 1.0 - float(t) / 1000.0, dtype=self.dtype, device=noisy_latents.device),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((h // 2, w // 2), cond), t, image_size)

    def layout(self, grid: tuple[int, int], cond: dict[str, Any] | None = None) -> TokenLayout:
        """Cross maps are :attr:`text_width` columns wide whatever the prompt's length."""
        return self.token_layout.at(grid, self.text_width)

    @contextmanager
    def probe_context(self) -> Iterator[None]:
        """The RoPE table is built and kept on the first forward: keep a fake-tensor forward's out of it."""
        rope = self.denoiser.rope_embedder
        before = rope.freqs_cis
        try:
            yield
        finally:
            rope.freqs_cis = before
