"""HunyuanDiT (diffusers ``HunyuanDiTPipeline``): a bilingual CLIP-style BERT (77 tokens) and mT5 (256 tokens)
whose states are concatenated along the sequence, DiT blocks with self-attention (attn1, 2-D RoPE) and
cross-attention (attn2) and long skip connections in the second half, DDPM noising (v-prediction)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Backbone, DenoiserInputs, PatchedLatents, TextSegment
from .layout import TokenLayout
from .diffusers_compat import get_2d_rotary_pos_embed, get_resize_crop_region_for_grid
from .registry import register_backbone
from .unet import _DDPMNoising

__all__ = ["HunyuanDiTBackbone"]

#: the pixel size whose token grid the pipeline's RoPE coordinates are normalised to
_ROPE_BASE_PX = 512


@register_backbone("HunyuanDiTPipeline")
class HunyuanDiTBackbone(PatchedLatents, _DDPMNoising, Backbone):
    """HunyuanDiT: BERT tokens then mT5 tokens as the cross-attention keys, both at the fixed lengths the
    transformer was built for (``text_len``, ``text_len_t5``); padded positions hold its learned padding
    embeddings, so every prompt gives maps of the same width."""

    family: ClassVar[str] = "hunyuandit"
    hook_table: ClassVar[str] = "hunyuandit"
    denoiser_attr: ClassVar[str] = "transformer"

    def _lengths(self) -> tuple[int, int]:
        cfg = self.denoiser.config
        return int(cfg.text_len), int(cfg.text_len_t5)

    def text_segments(self) -> list:
        bert, t5 = self._lengths()
        return [TextSegment(self.pipeline.tokenizer, 0, bert), TextSegment(self.pipeline.tokenizer_2, bert, t5)]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for index, (length, suffix) in enumerate(zip(self._lengths(), ("", "_t5"))):
            embeds, _, mask, _ = self.pipeline.encode_prompt(
                prompts, device=self.device, dtype=self.dtype, do_classifier_free_guidance=False,
                max_sequence_length=length, text_encoder_index=index,
            )  # fmt: skip
            out["encoder_hidden_states" + suffix] = embeds.to(self.dtype)
            out["text_embedding_mask" + suffix] = mask
        return out

    def rotary_embedding(self, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's 2-D RoPE (cos, sin) for a ``gh x gw`` token grid, its coordinates fitted into the grid
        of a 512 px image."""
        base = _ROPE_BASE_PX // self.vae_scale_factor // self.denoiser.config.patch_size
        crops = get_resize_crop_region_for_grid((gh, gw), base)
        head_dim = self.denoiser.inner_dim // self.denoiser.num_heads
        return get_2d_rotary_pos_embed(head_dim, crops, (gh, gw), device=device, output_type="pt")

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b = noisy_latents.shape[0]
        p = self.denoiser.config.patch_size
        gh, gw = noisy_latents.shape[-2] // p, noisy_latents.shape[-1] // p
        dev = noisy_latents.device
        h, w = image_size
        kwargs = {
            "hidden_states": noisy_latents,
            "timestep": torch.full((b,), float(t), dtype=self.dtype, device=dev),
            # original size, target size, crop top-left (used by checkpoints <= v1.1 only)
            "image_meta_size": torch.tensor([[h, w, h, w, 0, 0]], dtype=self.dtype, device=dev).repeat(b, 1),
            "style": torch.zeros(b, dtype=torch.long, device=dev),
            "image_rotary_emb": self.rotary_embedding(gh, gw, dev),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((gh, gw), cond), t, image_size)

    def layout(self, grid: tuple[int, int], cond: dict[str, Any] | None = None) -> TokenLayout:
        """The cross-attention keys are the BERT then the mT5 tokens, both at fixed lengths."""
        return self.token_layout.at(grid, sum(self._lengths()))
