"""HiDream-I1 (diffusers ``HiDreamImagePipeline``): pooled CLIP-L + CLIP-G vectors, T5 states and the hidden
states of every Llama-3.1 layer (each block gets its own layer), all padded to fixed lengths and unmasked; the
FLUX VAE, 2x2 patches; double-stream blocks over ``[image, T5, last Llama layer, the block's Llama layer]`` then
single-stream blocks over the same sequence, with mixture-of-experts feed-forwards. Flow matching on the
1000-step scale."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from .base import Backbone, DenoiserInputs, PatchedLatents, TextSegment
from .diffusers_compat import hidream_moe_class
from .dit import _FlowMatchNoising
from .layout import TokenLayout
from .registry import register_backbone

__all__ = ["HiDreamBackbone"]


@register_backbone("HiDreamImagePipeline")
class HiDreamBackbone(PatchedLatents, _FlowMatchNoising, Backbone):
    """HiDream-I1: image tokens first in every joint sequence, then the text: the T5 tokens, the last Llama
    layer's and the block's own Llama layer's (the same prompt tokens twice), each block of fixed length.

    A non-square image's tokens are padded to the model's ``max_seq`` (its maximal resolution) before the text;
    the layout then has one padded image block of that size (the padding's keys are zero vectors the model
    attends to; maps leave them out)."""

    family: ClassVar[str] = "hidream"
    hook_table: ClassVar[str] = "hidream"
    denoiser_attr: ClassVar[str] = "transformer"
    token_layout: ClassVar[TokenLayout] = TokenLayout("image-first")
    default_segment_t: ClassVar[int] = 150
    #: T5 and Llama tokens each; None: the pipeline's default (128)
    max_sequence_length: int | None = None

    def _length(self) -> int:
        return int(self.max_sequence_length or 128)

    def _lengths(self) -> tuple[int, int]:
        """(T5, Llama) tokens the pipeline keeps: the length, capped by each tokenizer's maximum."""
        pipe, n = self.pipeline, self._length()
        return min(n, int(pipe.tokenizer_3.model_max_length)), min(n, int(pipe.tokenizer_4.model_max_length))

    @property
    def native_resolution(self) -> int:
        """The VAE's ``sample_size`` (1024 px for HiDream-I1's FLUX VAE): the pipeline itself rescales every
        request to the area of its fixed default size."""
        return int(self.pipeline.vae.config.sample_size)

    def text_segments(self) -> list:
        pipe = self.pipeline
        n_t5, n_llama = self._lengths()
        return [
            TextSegment(pipe.tokenizer_3, 0, n_t5),
            TextSegment(pipe.tokenizer_4, n_t5, n_llama),
            TextSegment(pipe.tokenizer_4, n_t5 + n_llama, n_llama),
        ]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        t5, _, llama, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, prompt_4=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self._length(),
        )  # fmt: skip
        return {
            "encoder_hidden_states_t5": t5.to(self.dtype),
            "encoder_hidden_states_llama3": llama.to(self.dtype),
            "pooled_embeds": pooled.to(self.dtype),
        }

    def layout(self, grid, cond=None) -> TokenLayout:
        """Text keys: T5 + 2 x Llama tokens. A non-square grid is padded to the model's ``max_seq`` tokens."""
        cond = cond or {}
        t5, llama = cond.get("encoder_hidden_states_t5"), cond.get("encoder_hidden_states_llama3")
        text_len = int(t5.shape[1]) + 2 * int(llama.shape[-2]) if isinstance(t5, torch.Tensor) else None
        padded = grid[0] != grid[1]
        layout = TokenLayout("image-first", block_multiple=int(self.denoiser.max_seq)) if padded else self.token_layout
        return layout.at(grid, text_len)

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        """The latents go in as the model's own patch sequence (``patchify``) with its token mask and positions,
        and the grid as Python numbers, so the model never reads sizes back from a tensor (the catalog's shape
        probe runs on fake tensors). A square image's mask is all ones, which the model multiplies its keys by:
        the same result as its unmasked path."""
        b, _, h, w = noisy_latents.shape
        p = int(self.denoiser.config.patch_size)
        dev = noisy_latents.device
        tokens, masks, _, img_ids = self.denoiser.patchify(noisy_latents)
        if masks is None:
            masks = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=dev)
        kwargs = {
            "hidden_states": tokens,
            "hidden_states_masks": masks,
            "img_sizes": [(h // p, w // p)] * b,
            "img_ids": img_ids,
            "timesteps": torch.full((b,), float(t), dtype=self.dtype, device=dev),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((h // p, w // p), cond), t, image_size)

    @contextmanager
    def probe_context(self) -> Iterator[None]:
        """The mixture-of-experts feed-forwards route tokens on the host (``bincount().cpu()``), which a fake-tensor
        forward cannot do: during the catalog's shape probe each one is replaced in the module tree by its own
        shared expert, a feed-forward of the same input and output shape (no activation is listed inside it), and
        put back afterwards."""
        moe = hidream_moe_class()
        swapped = []
        for parent in self.denoiser.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, moe):
                    swapped.append((parent, name, child))
                    setattr(parent, name, child.shared_experts)
        try:
            yield
        finally:
            for parent, name, child in swapped:
                setattr(parent, name, child)
