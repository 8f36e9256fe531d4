"""Every use of a diffusers internal, in one place.

difffeat reuses a few of diffusers' private helpers (``_`` names: latent packing of the FLUX.2 / Qwen-Image
pipelines, Chroma's attention mask, the attention dispatcher's backend state) and two helper functions that
diffusers does not export at its top level (HunyuanDiT's RoPE). They may change in any diffusers release, so
the rest of difffeat reaches them only through the functions here, and ``tests/test_diffusers_compat.py``
checks that the installed diffusers is in :data:`TESTED_DIFFUSERS` and that each of :data:`INTERNALS` exists.

Moving to a new diffusers release: run that test; where an internal moved, change it here only.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

#: the diffusers versions these internals were checked against: [lowest, first untested)
TESTED_DIFFUSERS = ("0.42.0", "0.43.0")

#: ``(module, dotted attribute)`` of every diffusers internal used below; the version test resolves each
INTERNALS = (
    ("diffusers.pipelines.flux2.pipeline_flux2_klein", "Flux2KleinPipeline._pack_latents"),
    ("diffusers.pipelines.flux2.pipeline_flux2_klein", "Flux2KleinPipeline._patchify_latents"),
    ("diffusers.pipelines.flux2.pipeline_flux2_klein", "Flux2KleinPipeline._prepare_latent_ids"),
    ("diffusers.pipelines.flux2.pipeline_flux2", "Flux2Pipeline._pack_latents"),
    ("diffusers.pipelines.flux2.pipeline_flux2", "Flux2Pipeline._patchify_latents"),
    ("diffusers.pipelines.flux2.pipeline_flux2", "Flux2Pipeline._prepare_latent_ids"),
    ("diffusers.pipelines.qwenimage.pipeline_qwenimage", "QwenImagePipeline._pack_latents"),
    ("diffusers.pipelines.chroma.pipeline_chroma", "ChromaPipeline._prepare_attention_mask"),
    ("diffusers.models.attention_dispatch", "_AttentionBackendRegistry._active_backend"),
    ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor._attention_backend"),
    ("diffusers.models.embeddings", "get_2d_rotary_pos_embed"),
    ("diffusers.pipelines.hunyuandit.pipeline_hunyuandit", "get_resize_crop_region_for_grid"),
    # the 2026 families
    ("diffusers.pipelines.krea2.pipeline_krea2", "Krea2Pipeline._pack_latents"),
    ("diffusers.pipelines.bria_fibo.pipeline_bria_fibo", "BriaFiboPipeline._pack_latents"),
    ("diffusers.pipelines.bria_fibo.pipeline_bria_fibo", "BriaFiboPipeline._pack_latents_no_patch"),
    ("diffusers.pipelines.bria_fibo.pipeline_bria_fibo", "BriaFiboPipeline._prepare_latent_image_ids"),
    ("diffusers.pipelines.ideogram4.pipeline_ideogram4", "Ideogram4Pipeline._prepare_ids"),
    ("diffusers.pipelines.longcat_image.pipeline_longcat_image", "prepare_pos_ids"),
    ("diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage", "extract_glyph_text"),
    ("diffusers.models.transformers.transformer_hidream_image", "MOEFeedForwardSwiGLU"),
)


def resolve(module: str, attribute: str) -> Any:
    """The object at ``module`` + ``attribute`` (dotted); AttributeError / ImportError when it is gone."""
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- pipelines' latent helpers
def pack_latents(pipeline: Any, latents: torch.Tensor, *shape: int) -> torch.Tensor:
    """The pipeline's ``_pack_latents``: latents ``[B, C, H, W]`` -> image tokens ``[B, N, D]`` (FLUX.2 takes the
    latents alone; Qwen-Image also ``batch, channels, height, width``)."""
    return pipeline._pack_latents(latents, *shape)


def patchify_latents(pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    """FLUX.2's ``_patchify_latents``: VAE latents ``[B, C, H, W]`` -> ``[B, 4C, H/2, W/2]``."""
    return pipeline._patchify_latents(latents)


def prepare_latent_ids(pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    """FLUX.2's ``_prepare_latent_ids``: the position ids of the image tokens of ``latents``."""
    return pipeline._prepare_latent_ids(latents)


def prepare_attention_mask(pipeline: Any, batch: int, n_image: int, dtype: torch.dtype, text_mask: torch.Tensor) -> torch.Tensor:
    """Chroma's ``_prepare_attention_mask``: the joint text + image attention mask from the text mask."""
    return pipeline._prepare_attention_mask(batch, n_image, dtype, text_mask)


# --------------------------------------------------------------------------- attention dispatcher
def calls_dispatcher(processor: Any) -> bool:
    """Whether an attention processor calls diffusers' attention dispatcher (new-style processors carry an
    ``_attention_backend``, set by ``set_attention_backend``)."""
    return hasattr(processor, "_attention_backend")


def processor_backend(processor: Any) -> Any | None:
    """The backend a dispatcher-calling processor was given (``set_attention_backend``), else None."""
    return getattr(processor, "_attention_backend", None)


def active_backend() -> Any | None:
    """The globally active dispatcher backend (``attention_backend()`` context, ``DIFFUSERS_ATTN_BACKEND``)."""
    from diffusers.models import attention_dispatch

    registry = getattr(attention_dispatch, "_AttentionBackendRegistry", None)
    return getattr(registry, "_active_backend", None)


# --------------------------------------------------------------------------- HunyuanDiT RoPE
def get_2d_rotary_pos_embed(*args: Any, **kwargs: Any) -> Any:
    """``diffusers.models.embeddings.get_2d_rotary_pos_embed``."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed as fn

    return fn(*args, **kwargs)


def get_resize_crop_region_for_grid(*args: Any, **kwargs: Any) -> Any:
    """HunyuanDiT's ``get_resize_crop_region_for_grid`` (imported on use: the pipeline module pulls in
    transformers' image processors)."""
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid as fn

    return fn(*args, **kwargs)


# --------------------------------------------------------------------------- the 2026 families
def pack_latents_no_patch(pipeline: Any, latents: torch.Tensor, *shape: int) -> torch.Tensor:
    """Bria FIBO's ``_pack_latents_no_patch``: latents ``[B, C, H, W]`` -> one token per latent ``[B, H*W, C]``."""
    return pipeline._pack_latents_no_patch(latents, *shape)


def prepare_latent_image_ids(pipeline: Any, batch: int, height: int, width: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Bria FIBO's (FLUX-style) ``_prepare_latent_image_ids``: (0, row, column) of each image token."""
    return pipeline._prepare_latent_image_ids(batch, height, width, device, dtype)


def prepare_packed_ids(pipeline: Any, text_lengths: list[int], grid_h: int, grid_w: int, n_text: int, device: Any):
    """Ideogram 4's ``_prepare_ids``: (position, segment, indicator) ids of the packed ``[padding, text, image]``
    sequence."""
    return pipeline._prepare_ids(text_lengths, grid_h, grid_w, n_text, device)


def longcat_pos_ids(**kwargs: Any) -> torch.Tensor:
    """LongCat-Image's ``prepare_pos_ids`` (a pipeline-module function)."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

    return prepare_pos_ids(**kwargs)


def extract_glyph_text(prompt: str) -> str | None:
    """HunyuanImage 2.1's ``extract_glyph_text``: the quoted text of a prompt to render, or None."""
    from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text as fn

    return fn(prompt)


def hidream_moe_class() -> type:
    """HiDream-I1's mixture-of-experts feed-forward class (``MOEFeedForwardSwiGLU``)."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    return MOEFeedForwardSwiGLU
