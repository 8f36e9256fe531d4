"""Tiny random pipelines of every supported family, built fully offline (no hub access).

    pipe = difffeat.testing.tiny_pipeline("sdxl")      # a real StableDiffusionXLPipeline, random weights
    backbone = difffeat.load(pipe)

Configs follow the dummy components of diffusers' own pipeline tests, sized so a forward takes well under a
second on a CPU, with several heads everywhere and cross-attention on the down and up paths (so every kind of
activation exists). Tokenizers are trained here on a small word list (:mod:`difffeat.tokenizers`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["tiny_pipeline", "save_tiny_pipeline", "tiny_controlnet", "sd15_shaped_pipeline", "TINY_FAMILIES", "WORDS"]

#: words every tiny tokenizer knows as whole tokens (others still tokenize, as pieces / <unk> for T5)
WORDS = tuple(
    """a an the and of on in with at by for to from photo picture image of background foreground cat dog bird horse
    sheep cow car bus bike train boat plane person man woman child people tree grass sky road building house
    water sea river mountain snow sand table chair sofa bed tv bottle cup plant flower food pizza cake apple
    banana orange red green blue yellow black white brown grey pink purple small big large high quality best
    realistic detailed sitting standing running on under near next left right top bottom circle square
    triangle star heart cross ring diamond shape shapes object objects""".split()
) + (",", ".", "-")

_CLIP_CFG = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, layer_norm_eps=1e-5, hidden_act="gelu", max_position_embeddings=77)


@lru_cache(maxsize=None)
def _clip_tokenizer():
    from .tokenizers import build_clip_tokenizer

    return build_clip_tokenizer(WORDS, model_max_length=77)


@lru_cache(maxsize=None)
def _t5_tokenizer():
    """A T5-style (sentencepiece-like "▁" pieces) fast tokenizer over :data:`WORDS`, with ``</s>`` appended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in WORDS:
        vocab.setdefault("▁" + w, len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.-":
        vocab.setdefault("▁" + ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Metaspace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512)


def _clip_text(projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32, **_CLIP_CFG)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5, vocab_size=len(_t5_tokenizer()), relative_attention_num_buckets=8)
    return T5EncoderModel(cfg).eval()


def _vae(seed: int, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=16, sample_size=64)
    cfg.update(kw)
    return AutoencoderKL(**cfg).eval()


def _sd(seed: int):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    ).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_clip_text(seed=seed + 2), tokenizer=_clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=16,
    ).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 1), text_encoder=_clip_text(seed=seed + 2), text_encoder_2=_clip_text(True, seed=seed + 3),
        tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet, scheduler=sched,
    )


def _pixart(seed: int):
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    return PixArtSigmaPipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5(seed + 2), vae=_vae(seed + 1), transformer=transformer, scheduler=DDIMScheduler())


def _sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text(True, seed=seed + 2), tokenizer=_clip_tokenizer(), text_encoder_2=_clip_text(True, seed=seed + 3),
        tokenizer_2=_clip_tokenizer(), text_encoder_3=_t5(seed + 4), tokenizer_3=_t5_tokenizer(),
    )


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text(seed=seed + 2), tokenizer=_clip_tokenizer(), text_encoder_2=_t5(seed + 3),
        tokenizer_2=_t5_tokenizer(), transformer=transformer,
    )
    pipe.default_sample_size = 32
    return pipe


_BUILDERS: dict[str, Callable[[int], object]] = {"sd": _sd, "sdxl": _sdxl, "pixart": _pixart, "sd3": _sd3, "flux": _flux}
TINY_FAMILIES = tuple(_BUILDERS)


def tiny_pipeline(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random diffusers pipeline of ``family`` ("sd", "sdxl", "pixart", "sd3", "flux"), offline.

    The same seed gives identical weights. Images of 64x64 px give 32x32 latents (16x16 DiT tokens).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    pipe = _BUILDERS[family](seed)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny pipeline so ``DiffusionPipeline.from_pretrained(path)`` works."""
    path = Path(path)
    tiny_pipeline(family, seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def sd15_shaped_pipeline(seed: int = 0):
    """A small-channel pipeline with SD1.5's exact block structure (4 levels, cross-attention at the first
    three, 8 heads, 2 resnets per down level / 3 per up level, VAE factor 8), for benchmarks: 512 px
    inputs give SD1.5's 64x64 / 32x32 / 16x16 / 8x8 grids and its 16 cross-attention layers."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval()
    vae = _vae(seed + 1, block_out_channels=[16, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, sample_size=512)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=_clip_text(seed=seed + 2), tokenizer=_clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(seed: int = 0):
    """A tiny ControlNetModel matching the tiny "sd" UNet."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=2, in_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16, conditioning_embedding_out_channels=(16, 32),
    ).eval()
