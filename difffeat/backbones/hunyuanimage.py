"""HunyuanImage 2.1 (diffusers ``HunyuanImagePipeline``): Qwen2.5-VL text states of the prompt in the
pipeline's template (system prompt dropped), padded to a fixed length and masked; ByT5 states of quoted
("glyph") text; a 32x VAE whose latents are the tokens (patch 1); double-stream then single-stream blocks over
``[image, text]``. Flow matching on the 1000-step scale."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Backbone, DenoiserInputs, PipelineVaeScale, TextSegment
from .diffusers_compat import extract_glyph_text
from .dit import _FlowMatchNoising
from .registry import register_backbone

__all__ = ["HunyuanImageBackbone"]


@register_backbone("HunyuanImagePipeline")
class HunyuanImageBackbone(PipelineVaeScale, _FlowMatchNoising, Backbone):
    """HunyuanImage 2.1: image tokens first in every joint sequence (the default layout); the text block is
    :attr:`text_length` Qwen2.5-VL tokens, masked past the prompt, so maps have one width.

    ByT5 glyph states go in only when a prompt quotes text to render. The denoiser then puts each sample's
    valid ByT5 tokens *before* its prompt tokens, so class-token positions (:meth:`text_segments`) hold for
    prompts without quotes; without any, the ByT5 block (all masked) is left out, which changes nothing the
    image tokens see."""

    family: ClassVar[str] = "hunyuanimage"
    hook_table: ClassVar[str] = "hunyuanimage"
    denoiser_attr: ClassVar[str] = "transformer"
    default_segment_t: ClassVar[int] = 150
    #: Qwen2.5-VL tokens the denoiser sees; None: the pipeline's ``tokenizer_max_length`` (1000)
    max_sequence_length: int | None = None
    #: the guidance input of guidance-distilled checkpoints (the pipeline's ``distilled_guidance_scale``)
    guidance: float = 3.25

    @property
    def text_length(self) -> int:
        return int(self.max_sequence_length or self.pipeline.tokenizer_max_length)

    @property
    def native_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * self.vae_scale_factor

    @property
    def _patch(self) -> int:
        return int(self.denoiser.config.patch_size[0])

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self._patch

    def text_segments(self) -> list:
        pipe = self.pipeline
        return [TextSegment(pipe.tokenizer, 0, self.text_length, pipe.prompt_template_encode, int(pipe.prompt_template_encode_start_idx))]

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """The pipeline's encoding at :attr:`text_length` tokens (its ``tokenizer_max_length`` for the call)."""
        pipe = self.pipeline
        before, pipe.tokenizer_max_length = pipe.tokenizer_max_length, self.text_length
        try:
            embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompt=list(prompts), device=self.device, batch_size=len(prompts))
        finally:
            pipe.tokenizer_max_length = before
        cond = {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}
        if any(extract_glyph_text(p) is not None for p in prompts):  # some prompt quotes text to render
            cond.update(encoder_hidden_states_2=embeds_2.to(self.dtype), encoder_attention_mask_2=mask_2)
        return cond

    def layout(self, grid, cond=None):
        """Text keys: the Qwen2.5-VL block, plus the ByT5 block when glyph states go in."""
        cond = cond or {}
        states = cond.get("encoder_hidden_states")
        if not isinstance(states, torch.Tensor):
            return self.token_layout.at(grid)
        extra = cond.get("encoder_hidden_states_2")
        return self.token_layout.at(grid, int(states.shape[1]) + (int(extra.shape[1]) if extra is not None else 0))

    def denoiser_inputs(self, noisy_latents, t, cond, image_size) -> DenoiserInputs:
        b, _, h, w = noisy_latents.shape
        dev = noisy_latents.device
        cfg = self.denoiser.config
        timestep = torch.full((b,), float(t), dtype=self.dtype, device=dev)
        kwargs = {"hidden_states": noisy_latents, "timestep": timestep, **cond}
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((b,), float(self.guidance) * 1000.0, dtype=self.dtype, device=dev)
        if cfg.use_meanflow:  # the mean velocity over [t, t]: the instantaneous one
            kwargs["timestep_r"] = timestep
        p = self._patch
        return DenoiserInputs(kwargs, self.layout((h // p, w // p), cond), t, image_size)
