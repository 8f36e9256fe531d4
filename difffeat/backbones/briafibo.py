"""Bria FIBO (diffusers ``BriaFiboPipeline``): SmolLM3 text states (its last two layers side by side as the
text stream, and one hidden layer per block mixed into it), the prompt (FIBO's structured JSON caption, or any
text) padded to a fixed length and masked; a Wan 2.2 video VAE (16x, per-channel normalised latents) on single
frames, each latent one token; FLUX-style double-stream then single-stream blocks over ``[text, image]``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DenoiserInputs, TextSegment
from .diffusers_compat import pack_latents, pack_latents_no_patch, prepare_latent_image_ids
from .qwenimage import QwenImageBackbone
from .registry import register_backbone

__all__ = ["BriaFiboBackbone"]


@register_backbone("BriaFiboPipeline")
class BriaFiboBackbone(QwenImageBackbone):
    """Bria FIBO: text tokens first in every joint sequence (the Qwen-Image adapter's layout and its latent
    normalisation, which the Wan VAE shares), always :attr:`max_sequence_length` of them (masked past the
    prompt), so maps have one width and a batch equals its single runs."""

    family: ClassVar[str] = "briafibo"
    hook_table: ClassVar[str] = "briafibo"
    guidance: float = 0.0
    #: text tokens the denoiser sees; None: 3000, the pipeline's own cap (FIBO's JSON captions are long)
    max_sequence_length: int | None = None

    def _text_length(self) -> int:
        return int(self.max_sequence_length or 3000)

    @property
    def native_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * self.vae_scale_factor

    @property
    def _patching(self) -> bool:
        """Whether latents go in as 2x2 patches (a transformer of 4 x z_dim input channels) or one token each."""
        return int(self.denoiser.config.in_channels) == 4 * int(self.pipeline.vae.config.z_dim)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * (2 if self._patching else 1)

    def text_segments(self) -> list:
        tok = self.pipeline.tokenizer
        return [TextSegment(tok, 0, self._text_length())]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """The pipeline's encoding (no negative prompt), its states, per-block layers and mask padded to
        :attr:`max_sequence_length` tokens as the pipeline pads a batch; one layer per block (the last ones,
        or the last repeated), as the pipeline picks them."""
        pipe = self.pipeline
        n = self._text_length()
        embeds, _, _, mask, _, layers, _ = pipe.encode_prompt(
            prompt=list(prompts), device=self.device, guidance_scale=1.0, max_sequence_length=n
        )
        embeds, mask = pipe.pad_embedding(embeds, n, attention_mask=mask)
        blocks = len(self.denoiser.transformer_blocks) + len(self.denoiser.single_transformer_blocks)
        layers = list(layers)[-blocks:] if len(layers) >= blocks else list(layers) + [layers[-1]] * (blocks - len(layers))
        layers = [pipe.pad_embedding(layer.to(self.dtype), n)[0] for layer in layers]
        return {"encoder_hidden_states": embeds.to(self.dtype), "text_encoder_layers": layers, "text_mask": mask}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        pipe = self.pipeline
        cond = dict(cond)
        text_mask = cond.pop("text_mask")
        b, c, h, w = noisy_latents.shape
        dev = noisy_latents.device
        if self._patching:
            hidden, (gh, gw) = pack_latents(pipe, noisy_latents, b, c, h, w), (h // 2, w // 2)
        else:
            hidden, (gh, gw) = pack_latents_no_patch(pipe, noisy_latents, b, c, h, w), (h, w)
        n_text = cond["encoder_hidden_states"].shape[1]
        image_mask = torch.ones(b, gh * gw, dtype=torch.bool, device=dev)
        mask = torch.cat([text_mask.to(device=dev).bool(), image_mask], dim=1)[:, None, None, :]
        img_ids = prepare_latent_image_ids(pipe, b, gh, gw, dev, self.dtype)
        kwargs = {
            "hidden_states": hidden,
            "timestep": torch.full((b,), float(t), dtype=self.dtype, device=dev),
            "img_ids": img_ids[0] if img_ids.ndim == 3 else img_ids,
            "txt_ids": torch.zeros(n_text, 3, dtype=self.dtype, device=dev),
            "joint_attention_kwargs": {"attention_mask": mask},
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout((gh, gw), cond), t, image_size)
