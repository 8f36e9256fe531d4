"""Single-file checkpoints (``model.safetensors`` / ``.ckpt`` in the original, non-diffusers key layout) loaded
through diffusers' ``from_single_file``, with the architecture taken from ``config=`` (a hub id or a local
diffusers folder; offline only a local folder or a cached hub id resolves).

Two kinds of file are read, as diffusers documents them:

* a whole pipeline in one file (SD 1.x/2.x and SDXL releases and fine-tunes, ``sd3_medium_incl_clips*``):
  ``<Pipeline>.from_single_file(file, config=...)``; components the file lacks come from the config's folder;
* a denoiser alone (FLUX.1 ``flux1-dev.safetensors``, ``sd3.5_large.safetensors``): the file has no VAE, so
  ``<Denoiser>.from_single_file(file, config=..., subfolder=...)`` and the rest of the pipeline
  ``<Pipeline>.from_pretrained(config, <denoiser>=...)`` from the config (which then needs its weights).

Before anything loads, the file's keys (its header) are read to check that it is a checkpoint at all and that
its denoiser is the one the config's pipeline uses."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..errors import ModelNotFoundError

__all__ = ["SINGLE_FILE_SUFFIXES", "is_single_file", "checkpoint_keys", "denoiser_of_checkpoint", "from_single_file"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

#: prefix the original (CompVis / SGM / Stability / BFL) layouts put before the denoiser's keys, when any
ORIGINAL_DENOISER_PREFIX = "model.diffusion_model."
#: prefixes of a VAE inside a single file (diffusers' ``LDM_VAE_KEYS``): a file without one holds a denoiser alone
VAE_PREFIXES = ("first_stage_model.", "vae.")
#: a key only the original layout of each denoiser has (after the optional prefix) -> its diffusers class. Order
#: matters: Chroma's files also have FLUX's double blocks.
DENOISER_MARKERS: tuple[tuple[str, str], ...] = (
    ("input_blocks.0.0.weight", "UNet2DConditionModel"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "SD3Transformer2DModel"),
    ("distilled_guidance_layer.in_proj.bias", "ChromaTransformer2DModel"),
    ("double_blocks.0.img_attn.qkv.weight", "FluxTransformer2DModel"),
)
#: pipeline components that hold the denoiser
DENOISER_COMPONENTS = ("unet", "transformer")

CONFIG_HINT = (
    "pass the architecture with --model-config (CLI) or config= (API): a diffusers folder or hub id of the same "
    "model, e.g. config='stable-diffusion-v1-5/stable-diffusion-v1-5'; offline, a local folder such as one saved "
    "with `pipeline.save_pretrained(DIR)`"
)


def is_single_file(path: str | os.PathLike) -> bool:
    """True for a path that names one checkpoint file (by its suffix), existing or not."""
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names in a checkpoint file, read without loading its weights (a safetensors header, or a
    memory-mapped torch archive).

    Raises:
        ModelNotFoundError: no such file, or one that is not a readable safetensors / torch checkpoint.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelNotFoundError(f"checkpoint file {str(file)!r} does not exist")
    try:
        if file.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                return list(f.keys())
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
        return [str(k) for k in state]
    except Exception as exc:  # safetensors, pickle and zip readers raise many types for a file that is not theirs
        first = (str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__).rstrip(".")
        raise ModelNotFoundError(
            f"{file.name} is not a readable checkpoint ({first}). A single-file model is a .safetensors file or a "
            "torch .ckpt/.pt archive of tensors; otherwise pass a diffusers folder or a hub id."
        ) from None


def denoiser_of_checkpoint(keys: list[str]) -> str | None:
    """The diffusers class of the denoiser a checkpoint holds in its original layout (see
    :data:`DENOISER_MARKERS`), or None for a layout difffeat does not recognise (diffusers may still read it)."""
    names = {k.removeprefix(ORIGINAL_DENOISER_PREFIX) for k in keys}
    return next((cls for marker, cls in DENOISER_MARKERS if marker in names), None)


def _model_index(config: str) -> dict[str, Any]:
    """``model_index.json`` of ``config`` (a local folder or a cached / downloadable hub id)."""
    folder = Path(config).expanduser()
    try:
        if folder.is_dir():
            index = json.loads((folder / "model_index.json").read_text())
        else:
            index = DiffusionPipeline.load_config(config)
        if not isinstance(index.get("_class_name"), str):
            raise KeyError("_class_name")
        return dict(index)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFoundError(
            f"config {config!r} does not name a diffusers pipeline (no readable model_index.json: "
            f"{exc.__class__.__name__}); {CONFIG_HINT}"
            + (". HF_HUB_OFFLINE=1 is set, so a hub id must already be cached" if offline else "")
            + "."
        ) from None


def _pipeline_class(index: dict[str, Any]) -> type[DiffusionPipeline]:
    import diffusers

    cls = getattr(diffusers, index["_class_name"], None)
    if cls is None:
        raise ModelNotFoundError(f"config names pipeline class {index['_class_name']!r}, which diffusers does not have")
    return cls


def _denoiser(index: dict[str, Any]) -> tuple[str, str] | None:
    """(component name, diffusers class name) of the config's denoiser."""
    for name in DENOISER_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            return name, entry[1]
    return None


def _single_file_pipelines() -> list[str]:
    import diffusers
    from diffusers.loaders import FromSingleFileMixin

    from .registry import registered_pipelines

    return [n for n in registered_pipelines() if issubclass(getattr(diffusers, n, object), FromSingleFileMixin)]


def _check_fits(file: Path, keys: list[str], config: str, index: dict[str, Any], denoiser: tuple[str, str] | None) -> None:
    """The file's denoiser (by its original-layout keys) is the config's, and diffusers can read it."""
    from diffusers.loaders import FromSingleFileMixin

    cls = _pipeline_class(index)
    found = denoiser_of_checkpoint(keys)
    if found is not None and denoiser is not None and found != denoiser[1]:
        raise ModelNotFoundError(
            f"{file.name} holds a {found} (original layout) but config {config!r} is a {cls.__name__} whose "
            f"{denoiser[0]} is a {denoiser[1]}: pass --model-config / config= a diffusers folder or hub id of the "
            "checkpoint's own family."
        )
    if not issubclass(cls, FromSingleFileMixin):
        raise ModelNotFoundError(
            f"config {config!r} is a {cls.__name__}, which diffusers cannot load from a single file "
            f"(no from_single_file); single files load for {', '.join(_single_file_pipelines())}."
        )


def from_single_file(
    path: str | os.PathLike, config: str | os.PathLike | None, torch_dtype: torch.dtype, **pipeline_kwargs: Any
) -> DiffusionPipeline:
    """The pipeline of a single-file checkpoint: the file's weights, the config's architecture and (for
    components the file lacks: a FLUX file's VAE and text encoders) the config folder's weights.

    Raises:
        ModelNotFoundError: no such file, not a checkpoint, no ``config`` (or one that names no pipeline, or a
            pipeline of another family), or a checkpoint that does not fit the config's architecture.
    """
    file = Path(path).expanduser()
    keys = checkpoint_keys(file)
    if config is None:
        raise ModelNotFoundError(f"{file.name} is a single-file checkpoint, so difffeat needs its architecture: {CONFIG_HINT}.")
    config = os.fspath(Path(config).expanduser()) if Path(config).expanduser().is_dir() else os.fspath(config)
    index = _model_index(config)
    denoiser = _denoiser(index)
    _check_fits(file, keys, config, index, denoiser)
    cls = _pipeline_class(index)
    local = Path(config).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    denoiser_only = denoiser is not None and not any(k.startswith(VAE_PREFIXES) for k in keys)
    try:
        if denoiser_only:
            import diffusers

            name, class_name = denoiser
            model = getattr(diffusers, class_name).from_single_file(
                str(file), config=config, subfolder=name, torch_dtype=torch_dtype, local_files_only=local
            )
            pipe = cls.from_pretrained(config, torch_dtype=torch_dtype, local_files_only=local,
                                       **{name: model}, **pipeline_kwargs)  # fmt: skip
        else:
            pipe = cls.from_single_file(str(file), config=config, torch_dtype=torch_dtype, local_files_only=local,
                                        **pipeline_kwargs)  # fmt: skip
    except Exception as exc:  # diffusers raises many types for a checkpoint that does not fit its config
        first = (str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__).rstrip(".")
        raise ModelNotFoundError(
            f"could not load {file.name} as a {cls.__name__} with config {config!r}: {first}. Check that the "
            "checkpoint and the config are the same architecture"
            + (" and that the config folder holds the weights of the components the file lacks" if denoiser_only else "")
            + "."
        ) from None
    for module in pipe.components.values():  # diffusers builds a single file's T5 without .eval(): dropout on
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe
