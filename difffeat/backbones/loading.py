"""``difffeat.load``: a hub id, a local diffusers folder, an existing pipeline, or ``"shapes"`` -> Backbone."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..checks import check_device
from ..errors import InvalidOptionError, ModelNotFoundError
from ..resources import package_dir
from .base import Backbone
from .diffusers_compat import calls_dispatcher
from .single_file import SINGLE_FILE_SUFFIXES, checkpoint_keys, from_single_file, is_single_file
from .registry import adapter_for

__all__ = ["check_model", "xformers_wanted"]

log = logging.getLogger(__name__)

#: names of models shipped inside the package (no download)
EMBEDDED_MODELS = {"shapes": "weights/shapes"}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def default_device() -> torch.device:
    """The device accelerate assigns to this process (a GPU per process under ``accelerate launch``)."""
    from accelerate import PartialState

    return PartialState().device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> float16 on CUDA, float32 elsewhere; strings like "fp16"/"bf16" accepted."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InvalidOptionError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}") from None


def wrap_pipeline(pipeline: DiffusionPipeline, name: str | None = None) -> Backbone:
    """Wrap an already-built diffusers pipeline in its family's backbone adapter."""
    cls = adapter_for(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return cls(pipeline, name=name)


class _DropTorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision.

    diffusers' pipeline modules import ``CLIPImageProcessor`` (used only by safety checkers and IP-adapters,
    never by difffeat), so without torchvision every load printed two such lines. torchvision cannot be
    installed beside the CPU torch wheel here, and the fallback changes nothing difffeat does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence library warnings that concern components difffeat does not use, while a pipeline loads."""
    notice_logger = logging.getLogger("transformers.utils.import_utils")
    notice_filter = _DropTorchvisionFallbackNotice()
    notice_logger.addFilter(notice_filter)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:  # from_single_file's per-component progress bars and dtype notices
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        notice_logger.removeFilter(notice_filter)
        for lib, (verbosity, bars) in zip(libraries, before):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _from_folder(path: Path, dtype: torch.dtype, **pipeline_kwargs: Any) -> DiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json). Pass a folder saved with "
            "`pipeline.save_pretrained(...)` or downloaded with `huggingface-cli download REPO_ID --local-dir DIR`."
        )
    _check_model_index(path)
    try:
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **pipeline_kwargs)
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:  # missing or mismatched weight files, raised deep inside diffusers
        first = (str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__).rstrip(".")
        variants = _weight_variants(path)
        hint = ""
        if variants and pipeline_kwargs.get("variant") not in variants:
            hint = f" The folder's weights are saved as variant(s) {sorted(variants)}: pass variant={sorted(variants)[0]!r}."
        raise ModelNotFoundError(f"could not load the diffusers folder {str(path)!r}: {first}.{hint}") from None


def _check_model_index(path: Path) -> None:
    """``model_index.json`` names a pipeline class and every component it lists has its subfolder."""
    import json

    index_file = path / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"{str(index_file)!r} is not valid JSON ({exc}); the folder is not a diffusers pipeline") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ModelNotFoundError(f"{str(index_file)!r} names no pipeline class ('_class_name'); save the folder with "
                                 "`pipeline.save_pretrained(...)`")
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0]]
    missing = [k for k in components if not (path / k).is_dir()]
    if missing:
        raise ModelNotFoundError(f"the pipeline folder {str(path)!r} lacks the component folder(s) "
                                 f"{', '.join(m + '/' for m in missing)} that its model_index.json lists; copy the "
                                 "complete pipeline (every subfolder)")


def _weight_variants(path: Path) -> set[str]:
    """Variant tags of the weight files in a pipeline folder (``unet/diffusion_pytorch_model.fp16.safetensors``
    -> ``fp16``)."""
    variants = set()
    for file in path.glob("*/*.safetensors"):
        parts = file.name.split(".")
        if len(parts) == 3:  # name.variant.safetensors, or name.variant-00001-of-00002.safetensors when sharded
            variants.add(parts[1].split("-")[0])
    return variants


def embedded_model_path(name: str) -> Path:
    """Folder of an embedded model shipped inside the package."""
    path = package_dir() / EMBEDDED_MODELS[name]
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the embedded {name!r} model is missing from this installation (expected at {path}); reinstall difffeat"
        )
    return path


def check_model(model: Any) -> None:
    """Fail early, without loading weights, for a model that cannot load: a missing or incomplete folder, a
    ``model_index.json`` naming no pipeline, a single file that is missing or no checkpoint, or (offline) a hub
    id that is not in the local cache."""
    if isinstance(model, (Backbone, DiffusionPipeline)):
        return
    name = os.fspath(model)
    if name in EMBEDDED_MODELS:
        embedded_model_path(name)
    elif is_single_file(name) and not Path(name).expanduser().is_dir():
        checkpoint_keys(name)  # exists and is a readable checkpoint (its config is checked when it loads)
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "model_index.json").is_file():
            _from_folder(path, torch.float32)  # raises the not-a-pipeline-folder error
        _check_model_index(path)
    elif name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith("/"):
        raise ModelNotFoundError(
            f"model folder {name!r} does not exist. Pass an existing diffusers folder, a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5', or 'shapes' for the embedded model."
        )
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "model_index.json"), str):
            raise ModelNotFoundError(f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
                                     "download it elsewhere (`huggingface-cli download ID --local-dir DIR`) and pass the folder")


def load(
    model: str | os.PathLike | DiffusionPipeline | Backbone = "shapes",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    xformers: bool | None = None,
    config: str | os.PathLike | None = None,
    **pipeline_kwargs: Any,
) -> Backbone:
    """Load a diffusion model as a :class:`Backbone`.

    Args:
        model: ``"shapes"`` (the embedded model, no download), a local diffusers folder, a Hugging Face hub id
            (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``), an already-built diffusers pipeline, or a
            Backbone (returned as is).
        device: where to run; default: the device accelerate assigns to this process (CUDA when available).
        dtype: default float16 on CUDA, float32 on CPU; "fp16", "bf16", "fp32" or a torch dtype.
        xformers: ``True`` switches attention to xformers (needs CUDA and ``difffeat[gpu]``). Default off: PyTorch
            SDPA already runs fused kernels on CUDA, and the attention maps of dispatcher-style families
            (FLUX, SD3.5, Qwen-Image...) are only observable there (see :func:`xformers_wanted`).
        config: for a single-file checkpoint (``model.safetensors`` / ``.ckpt`` in the original key layout):
            a hub id or local diffusers folder of the same architecture, read by diffusers' ``from_single_file``
            (offline only a local folder or a cached hub id resolves). A file holding the whole pipeline takes
            only the config's architecture (and tokenizers, scheduler); a file holding a denoiser alone (FLUX.1
            releases) also takes the other components' weights from the config. Only for single files.
        pipeline_kwargs: forwarded to ``DiffusionPipeline.from_pretrained`` (e.g. ``variant="fp16"``).

    Raises:
        ModelNotFoundError: no such folder, not a diffusers folder, or a hub id that cannot be fetched; for a single
            file: no such file, not a checkpoint, no (or an unresolvable) ``config``, a config of another family.
        InvalidOptionError: ``config`` given for a model that is not a single file; ``model`` of another type
            (a number, a list...).
        UnsupportedBackboneError: a pipeline class without an adapter.
    """
    if isinstance(model, Backbone):
        return model
    if not isinstance(model, (str, os.PathLike, DiffusionPipeline)):
        raise InvalidOptionError(
            f"model must be 'shapes', a hub id, a local folder or single-file checkpoint path, a diffusers pipeline "
            f"or a Backbone; got {type(model).__name__} {model!r}"
        )
    dev = torch.device(check_device(str(device))) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    if isinstance(model, DiffusionPipeline):
        backbone = wrap_pipeline(model)
        if device is not None or dtype is not None:
            model.to(device=dev, dtype=torch_dtype)
    else:
        name = os.fspath(model)
        single = is_single_file(name) and not Path(name).expanduser().is_dir()
        if config is not None and not single:
            raise InvalidOptionError(
                f"config= (--model-config) is only for single-file checkpoints (model.safetensors / .ckpt); {name!r} "
                "is not one: a diffusers folder or hub id carries its own architecture, so drop the option"
            )
        if name in EMBEDDED_MODELS:
            pipe = _from_folder(embedded_model_path(name), torch_dtype)
        elif single:
            with _quiet_loading():
                pipe = from_single_file(name, config, torch_dtype, **pipeline_kwargs)
        elif Path(name).expanduser().is_file():
            raise ModelNotFoundError(
                f"{name!r} is a file but not a checkpoint difffeat reads: single-file checkpoints end in "
                f"{', '.join(SINGLE_FILE_SUFFIXES)}; otherwise pass a diffusers folder, a hub id, or 'shapes'"
            )
        elif Path(name).expanduser().exists():
            pipe = _from_folder(Path(name).expanduser(), torch_dtype, **pipeline_kwargs)
        else:
            check_model(name)
            try:
                with _quiet_loading():
                    pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=torch_dtype, **pipeline_kwargs)
            except Exception as exc:  # hub errors come in many types (OSError, HTTP, offline mode...)
                offline = os.environ.get("HF_HUB_OFFLINE") == "1"
                raise ModelNotFoundError(
                    f"could not load {name!r} from the Hugging Face hub ({exc.__class__.__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}). "
                    + ("HF_HUB_OFFLINE=1 is set, so only cached models load. " if offline else "")
                    + "Check the id, log in for gated models, or download it elsewhere "
                    "(`huggingface-cli download ID --local-dir DIR`) and pass the folder."
                ) from None
        pipe.to(dev)
        backbone = wrap_pipeline(pipe, name=name)
    _configure_attention(backbone, dev, xformers)
    return backbone


def xformers_wanted(requested: bool | None, device: torch.device, installed: bool) -> bool:
    """Whether :func:`load` switches the pipeline to xformers attention.

    Only when asked (``requested=True``): the default (``None``) and ``False`` keep PyTorch's
    ``scaled_dot_product_attention``, which already runs flash / memory-efficient kernels on CUDA and is where
    the attention observers see the probabilities of dispatcher-style attention (FLUX, SD3.5, Qwen-Image...);
    xformers there would make every attention map an :class:`~difffeat.errors.AttentionBackendError`.

    Raises:
        ValueError: ``requested=True`` without CUDA, or without xformers installed.
    """
    if not requested:
        return False
    if device.type != "cuda":
        raise ValueError("xformers=True needs a CUDA device (xformers kernels do not run on the CPU)")
    if not installed:
        raise ValueError("xformers=True but xformers is not installed: pip install 'difffeat[gpu]'")
    return True


def _dispatcher_attention(backbone: Backbone) -> bool:
    """True when some attention of the denoiser calls diffusers' attention dispatcher (new-style processors)."""
    processors = getattr(backbone.denoiser, "attn_processors", {})
    return any(calls_dispatcher(p) for p in processors.values())


def _configure_attention(backbone: Backbone, device: torch.device, xformers: bool | None) -> None:
    import importlib.util

    if not xformers_wanted(xformers, device, importlib.util.find_spec("xformers") is not None):
        return
    try:
        backbone.pipeline.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # installed but built for another torch/CUDA: its kernels fail to load or run
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ValueError(
            f"xformers=True but xformers does not run here ({reason}); install an xformers build that matches "
            "this torch and CUDA, or leave xformers off (the default)"
        ) from None
    if _dispatcher_attention(backbone):
        warnings.warn(
            f"xformers=True: the {backbone.family} denoiser's attention now runs through xformers in diffusers' "
            "attention dispatcher, so its attention maps cannot be captured (segmentation raises "
            "AttentionBackendError); features and q/k/v still work. Leave xformers off to capture maps.",
            stacklevel=3,
        )
