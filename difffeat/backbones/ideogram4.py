"""Ideogram 4 (diffusers ``Ideogram4Pipeline``): hidden states of 13 Qwen3-VL layers side by side per token of
the chat-formatted prompt, padded on the left to a fixed length; a FLUX.2-type VAE whose latents are cut into
2x2 patches (channels ordered (row, column, channel)) and normalised by its batch-norm statistics; one packed
sequence ``[padding, text, image]`` through single-stream blocks, the padding kept apart by a block-diagonal
mask. Flow matching with the model's time running from noise (0) to data (1). The pipeline's second,
unconditional transformer (asymmetric guidance) is not used: features come from the conditional one."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DenoiserInputs, TextSegment
from .diffusers_compat import prepare_packed_ids
from .dit import PackedLatentTransformer
from .layout import TokenLayout
from .registry import register_backbone

__all__ = ["Ideogram4Backbone"]

_SLOT = "\x00PROMPT\x00"


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@register_backbone("Ideogram4Pipeline")
class Ideogram4Backbone(PackedLatentTransformer):
    """Ideogram 4: text first in the packed sequence, :attr:`max_sequence_length` slots of it (the prompt
    right-aligned, the padding in front masked), so maps have one width and a batch equals its single runs."""

    family: ClassVar[str] = "ideogram4"
    hook_table: ClassVar[str] = "ideogram4"
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first")
    #: text slots of the packed sequence; None: the pipeline's default (2048)
    max_sequence_length: int | None = None

    def _text_length(self) -> int:
        return int(self.max_sequence_length or 2048)

    @property
    def _patch(self) -> int:
        return int(self.pipeline.patch_size)

    @property
    def native_resolution(self) -> int:
        """2048 px (the pipeline's default size), unless the pipeline sets a ``default_sample_size``."""
        sample = getattr(self.pipeline, "default_sample_size", None)
        return int(sample) * self.vae_scale_factor * self._patch if sample else 2048

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self._patch

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.size_multiple
        return int(self.pipeline.vae.config.latent_channels) * self._patch**2, height // f, width // f

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1).to(like)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, p*p*C, h, w]``: each latent patch's channels in the pipeline's (row, column,
        channel) order, normalised by the VAE's batch-norm statistics (the inverse of the pipeline's decoding)."""
        vae = self.pipeline.vae
        z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        b, c, h, w = z.shape
        p = self._patch
        z = z.view(b, c, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4).reshape(b, p * p * c, h // p, w // p)
        mean, std = self._bn(z)
        return (z - mean) / std

    def text_segments(self) -> list:
        """The prompt in the tokenizer's chat template, the whole text right-aligned in its slots."""
        tok = self.pipeline.tokenizer
        text = tok.apply_chat_template(_messages(_SLOT), add_generation_prompt=True, tokenize=False)
        prefix, _, suffix = text.partition(_SLOT)
        return [TextSegment(tok, 0, self._text_length(), prefix + "{}" + suffix, pad_left=True)]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """The text slots of the pipeline's packed conditioning (its features are grid-independent) and each
        prompt's token count (which fixes where its text starts)."""
        pipe = self.pipeline
        n = self._text_length()
        tok = pipe.tokenizer
        lengths = [
            len(tok(tok.apply_chat_template(_messages(p), add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"])
            for p in prompts
        ]  # fmt: skip
        features, *_ = pipe.encode_prompt(prompt=list(prompts), grid_h=1, grid_w=1, max_sequence_length=n, device=self.device)
        return {"encoder_hidden_states": features[:, :n].to(self.dtype), "text_lengths": lengths}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        pipe = self.pipeline
        cond = dict(cond)
        lengths = cond.pop("text_lengths")
        text = cond["encoder_hidden_states"]
        b, c, gh, gw = noisy_latents.shape
        n_text, dev = text.shape[1], noisy_latents.device
        position_ids, segment_ids, indicator = prepare_packed_ids(pipe, lengths, gh, gw, n_text, dev)
        tokens = noisy_latents.flatten(2).transpose(1, 2)  # [B, gh*gw, p*p*C]
        kwargs = {
            "hidden_states": torch.cat([tokens.new_zeros(b, n_text, c), tokens], dim=1),
            "timestep": torch.full((b,), 1.0 - float(t) / 1000.0, dtype=self.dtype, device=dev),
            "encoder_hidden_states": torch.cat([text, text.new_zeros(b, gh * gw, text.shape[-1])], dim=1),
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "indicator": indicator,
        }
        return DenoiserInputs(kwargs, self.layout((gh, gw), cond), t, image_size)
