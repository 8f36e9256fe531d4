"""Single-file checkpoints (``model.safetensors`` / ``.ckpt`` in the original, non-diffusers key layout) loaded
through diffusers' ``from_single_file``, with the architecture taken from ``config=`` (a hub id or a local
diffusers folder; offline only a local folder resolves)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..errors import ModelNotFoundError

__all__ = ["SINGLE_FILE_SUFFIXES", "is_single_file", "from_single_file"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def is_single_file(path: str | os.PathLike) -> bool:
    """True for a path that names one checkpoint file (by its suffix), existing or not."""
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def _pipeline_class(config: str) -> type[DiffusionPipeline]:
    """The pipeline class named by ``config``'s ``model_index.json`` (a local folder or a cached hub id)."""
    import diffusers

    folder = Path(config).expanduser()
    try:
        if folder.is_dir():
            index = json.loads((folder / "model_index.json").read_text())
        else:
            index = DiffusionPipeline.load_config(config)
        return getattr(diffusers, index["_class_name"])
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFoundError(
            f"config {config!r} does not name a diffusers pipeline ({exc.__class__.__name__}). Pass config= a local "
            "diffusers folder of the same architecture (with model_index.json) or a hub id"
            + (" that is already cached (HF_HUB_OFFLINE=1 is set)" if offline else "")
            + ", e.g. config='stable-diffusion-v1-5/stable-diffusion-v1-5'."
        ) from None


def from_single_file(
    path: str | os.PathLike, config: str | os.PathLike | None, torch_dtype: torch.dtype, **pipeline_kwargs: Any
) -> DiffusionPipeline:
    """``<PipelineClass>.from_single_file(path, config=config)``: the checkpoint's weights, the config's
    architecture and (for components the file lacks, e.g. text encoders) the config folder's weights.

    Raises:
        ModelNotFoundError: no such file, no ``config`` (or one that names no pipeline), or a checkpoint that
            does not fit the config's architecture.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelNotFoundError(f"checkpoint file {str(file)!r} does not exist")
    if config is None:
        raise ModelNotFoundError(
            f"{file.name} is a single-file checkpoint: difffeat needs its architecture. Pass config= (CLI: "
            "`difffeat catalog FILE --model-config DIR`) naming a diffusers folder or hub id of the same model, e.g. "
            "load('model.safetensors', "
            "config='stable-diffusion-v1-5/stable-diffusion-v1-5'); offline, a local folder such as one saved with "
            "`pipeline.save_pretrained(DIR)`."
        )
    cls = _pipeline_class(os.fspath(config))
    local = Path(config).expanduser().is_dir()
    try:
        return cls.from_single_file(
            str(file), config=os.fspath(Path(config).expanduser()) if local else os.fspath(config),
            torch_dtype=torch_dtype, local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1",
            **pipeline_kwargs,
        )  # fmt: skip
    except Exception as exc:  # diffusers raises many types for a checkpoint that does not fit its config
        first = (str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__).rstrip(".")
        raise ModelNotFoundError(
            f"could not load {file.name} as a {cls.__name__} with config {os.fspath(config)!r}: {first}. Check that "
            "the checkpoint and the config are the same architecture."
        ) from None
