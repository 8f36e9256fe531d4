"""Gemma-encoded transformer families: Sana (linear-attention DiT on a 32x deep-compression autoencoder, Gemma 2
text behind a complex human instruction) and Lumina 2 (a unified [text, image] sequence, Gemma 2 text behind a
system prompt)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import Backbone, DenoiserInputs, PatchedLatents, PipelineVaeScale, TextSegment
from .dit import _default_max_length, _FlowMatchNoising
from .layout import TokenLayout
from .probing import encode_for_probe
from .registry import register_backbone

__all__ = ["SanaBackbone", "Lumina2Backbone"]


def _call_default(pipeline: Any, name: str) -> Any:
    """The default of a ``pipeline.__call__`` argument (where a pipeline keeps its prompt template)."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default


class _PatchGeometry(PipelineVaeScale, PatchedLatents):
    """Latents straight from the VAE, patchified inside the denoiser (``patch_size``)."""

    def _grid(self, latents: torch.Tensor) -> tuple[int, int]:
        p = int(self.denoiser.config.patch_size)
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p


@register_backbone("SanaPipeline")
class SanaBackbone(_PatchGeometry, _FlowMatchNoising, Backbone):
    """Sana: DC-AE latents (32x downsampling), DiT blocks with ReLU linear self-attention (attn1), softmax
    cross-attention to the Gemma 2 text (attn2) and a convolutional feed-forward.

    The prompt is encoded behind the pipeline's complex human instruction (its ``__call__`` default); the
    denoiser sees the sequence's first token and its last ``max_sequence_length - 1`` tokens, so the
    instruction drops out and every prompt gives ``max_sequence_length`` text tokens (padding masked)."""

    family: ClassVar[str] = "sana"
    hook_table: ClassVar[str] = "sana"
    denoiser_attr: ClassVar[str] = "transformer"
    default_segment_t: ClassVar[int] = 150
    #: text tokens the denoiser sees; None: the pipeline's 300
    max_sequence_length: int | None = None
    #: the instruction lines put before the prompt; None: the pipeline's default, ``[]``: none
    complex_human_instruction: Sequence[str] | None = None

    def _text_length(self) -> int:
        return _default_max_length(self)

    def _instruction(self) -> list[str]:
        lines = self.complex_human_instruction
        return list(_call_default(self.pipeline, "complex_human_instruction") if lines is None else lines)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> DC-AE latents times the VAE's scaling factor, ``[B, 32, H/32, W/32]``."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent
        return latents * vae.config.scaling_factor

    def text_segments(self) -> list:
        """The tokenized text is instruction + lower-cased prompt; the denoiser's token p >= 1 is the tokenized
        token ``p + n - 2`` (``n`` the instruction's tokens with BOS), token 0 the BOS."""
        tok, n = self.pipeline.tokenizer, self._text_length()
        lines = self._instruction()
        if not lines:
            return [TextSegment(tok, 0, n, lowercase=True)]
        instruction = "\n".join(lines)
        return [TextSegment(tok, 0, n, template=instruction + "{}", drop=len(tok.encode(instruction)) - 2, lowercase=True)]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device, max_sequence_length=self._text_length(),
            complex_human_instruction=self._instruction(),
        )  # fmt: skip
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b = noisy_latents.shape[0]
        scale = float(getattr(self.denoiser.config, "timestep_scale", 1.0))
        kwargs = {
            "hidden_states": noisy_latents,
            "timestep": torch.full((b,), float(t) * scale, dtype=self.dtype, device=noisy_latents.device),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout(self._grid(noisy_latents), cond), t, image_size)


@register_backbone("Lumina2Pipeline")
class Lumina2Backbone(_PatchGeometry, _FlowMatchNoising, Backbone):
    """Lumina 2 (Lumina-Image 2.0): Gemma 2 text (second-to-last hidden states) behind the pipeline's system
    prompt, refined alone (``context_refiner``) while the image tokens are (``noise_refiner``), then joint
    self-attention blocks (``layers``) over each sample's unpadded text followed by its image tokens.

    Each sample's text length decides where its image tokens start (``DenoiserInputs.image_offsets``); maps
    are laid out over the ``max_sequence_length`` text slots (slots past a prompt's end get zero weight), so
    maps have one width and a batch equals its single runs. The denoiser's time runs from 0 (noise) to 1
    (clean): ``1 - t/1000``."""

    family: ClassVar[str] = "lumina2"
    hook_table: ClassVar[str] = "lumina2"
    #: joint blocks over [each sample's unpadded text, its image tokens, padding]
    token_layout: ClassVar[TokenLayout] = TokenLayout("text-first", packed=True)
    denoiser_attr: ClassVar[str] = "transformer"
    default_segment_t: ClassVar[int] = 150
    #: text tokens (system prompt included); None: the pipeline's 256
    max_sequence_length: int | None = None
    #: None: the pipeline's own system prompt
    system_prompt: str | None = None

    def _text_length(self) -> int:
        return _default_max_length(self)

    def _system_prompt(self) -> str:
        return self.pipeline.system_prompt if self.system_prompt is None else self.system_prompt

    def text_segments(self) -> list:
        """The pipeline encodes ``system prompt + " <Prompt Start> " + prompt``; every token reaches the denoiser."""
        return [TextSegment(self.pipeline.tokenizer, 0, self._text_length(), template=self._system_prompt() + " <Prompt Start> {}")]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device, system_prompt=self._system_prompt(),
            max_sequence_length=self._text_length(),
        )  # fmt: skip
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b = noisy_latents.shape[0]
        kwargs = {
            "hidden_states": noisy_latents,
            "timestep": torch.full((b,), 1.0 - float(t) / 1000.0, dtype=self.dtype, device=noisy_latents.device),
            **cond,
        }
        return DenoiserInputs(kwargs, self.layout(self._grid(noisy_latents), cond), t, image_size)

    def layout(self, grid: tuple[int, int], cond: dict[str, Any] | None = None) -> TokenLayout:
        """Each sample's text length (its mask's sum) is where its image tokens start in the joint blocks."""
        if cond is None:
            return self.token_layout.at(grid)
        offsets = cond["encoder_attention_mask"].sum(dim=1)  # [B]
        return self.token_layout.at(grid, int(cond["encoder_hidden_states"].shape[1]), offsets)

    def probe_conditioning(self, mode: Any) -> dict[str, Any]:
        """The transformer turns its text mask into per-sample lengths on the host (``tolist()``): the prompt is
        encoded for real and the mask kept readable as a constant fake."""
        return encode_for_probe(self, mode, real=True)
