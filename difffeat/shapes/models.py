"""Builders for the shapes model's components (Stable-Diffusion architecture, tiny sizes).

All sizes come from :class:`ModelConfig`, so tests can build a toy variant and the shipped model is
reproducible from its config alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

__all__ = ["ModelConfig", "build_vae", "build_unet", "build_text_encoder", "build_schedulers", "count_params"]


@dataclass
class ModelConfig:
    """Architecture of the shapes model (defaults = the shipped model)."""

    image_size: int = 64
    # VAE: 64x64x3 -> 16x16x4 (two downsamples)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    # UNet on 16x16 latents; cross-attention at 16x16 and 8x8 on the down and the up path.
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_heads: int = 4  # diffusers' ``attention_head_dim`` of UNet2DConditionModel is the head COUNT
    norm_groups: int = 32
    # Text encoder (CLIP, from scratch)
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    max_length: int = 77
    # Noise schedule (as Stable Diffusion)
    train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(cfg.norm_groups, min(cfg.vae_channels)),
        sample_size=cfg.image_size,
    )


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    if n < 3:
        raise ValueError("the shapes UNet needs >= 3 blocks (cross-attention at two resolutions + a plain block)")
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        attention_head_dim=cfg.unet_heads,
        cross_attention_dim=cfg.text_hidden,
        norm_num_groups=min(cfg.norm_groups, min(cfg.unet_channels)),
    )


def build_text_encoder(cfg: ModelConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.text_hidden,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return CLIPTextModel(config)


def build_schedulers(cfg: ModelConfig) -> tuple[DDPMScheduler, DDIMScheduler]:
    """Training (DDPM) and sampling (DDIM) schedulers with SD's scaled-linear betas."""
    common = dict(
        num_train_timesteps=cfg.train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
    )
    ddpm = DDPMScheduler(**common)
    ddim = DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)
    return ddpm, ddim


def count_params(module) -> int:  # noqa: ANN001 - any torch module
    return sum(p.numel() for p in module.parameters())
