"""Whether a LoRA file fits a model, read from the file's header and the model's config (no weights load).

A LoRA's cross-attention key projection takes the text width of the family it was trained for (SD1.x: 768,
SD2.x: 1024, SDXL: 2048); a transformer LoRA (FLUX, SD3 ...) names ``transformer`` blocks. Compared with the
denoiser config of the model to load, a LoRA of another family is refused before anything loads.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import DifffeatError

__all__ = ["lora_text_width", "model_denoiser_config", "check_lora_fits"]


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise DifffeatError(f"LoRA file {str(path)!r} is not a readable .safetensors file ({exc})") from None


def lora_text_width(path: str | os.PathLike) -> tuple[str, int | None]:
    """``(kind, width)`` of a LoRA ``.safetensors`` file: kind ``"unet"`` or ``"transformer"`` (or ``"unknown"``),
    width = the input width of its cross-attention key projection (None if it has none)."""
    header = {k: v for k, v in _header(Path(path)).items() if k != "__metadata__"}
    keys = list(header)
    if any(k.startswith(("transformer.", "lora_transformer_")) or "double_blocks" in k or "single_blocks" in k for k in keys):
        kind = "transformer"
    elif any("unet" in k or "down_blocks" in k or "input_blocks" in k for k in keys):
        kind = "unet"
    else:
        kind = "unknown"
    for k in keys:
        low = k.lower()
        if "attn2" in low and "to_k" in low and any(d in low for d in ("lora_a", "lora.down", "lora_down")):
            shape = header[k].get("shape", [])
            if len(shape) == 2:
                return kind, int(shape[1])
    return kind, None


def model_denoiser_config(model) -> dict | None:
    """The denoiser config (``unet/`` or ``transformer/config.json``) of an embedded model, local folder or
    cached hub id; None when it cannot be read without loading."""
    from ..backbones.loading import EMBEDDED_MODELS, embedded_model_path

    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if name is None:
        return None
    folder = embedded_model_path(name) if name in EMBEDDED_MODELS else Path(name).expanduser()
    for sub in ("unet", "transformer"):
        if folder.is_dir():
            cfg = folder / sub / "config.json"
            if cfg.is_file():
                return {**json.loads(cfg.read_text()), "_denoiser": sub}
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(name, f"{sub}/config.json")
            except Exception:  # noqa: BLE001 - any failure: we cannot tell cheaply
                hit = None
            if isinstance(hit, str):
                return {**json.loads(Path(hit).read_text()), "_denoiser": sub}
    return None


def check_lora_fits(lora: str | os.PathLike, model) -> None:
    """Raise a one-line error if the LoRA file is clearly for another family than ``model`` (no weights load);
    pass when either side cannot be read cheaply (the load then reports any mismatch)."""
    path = Path(os.path.expanduser(os.fspath(lora)))
    if not path.is_file() or path.suffix != ".safetensors":
        return
    cfg = model_denoiser_config(model)
    if cfg is None:
        return
    kind, width = lora_text_width(path)
    if kind != "unknown" and kind != cfg["_denoiser"]:
        raise DifffeatError(f"LoRA {str(path)!r} is for a {kind} model but {os.fspath(model)!r} has a {cfg['_denoiser']}; "
                            "use a LoRA trained for this base model")
    dim = cfg.get("cross_attention_dim")
    if isinstance(dim, (list, tuple)):
        dim = dim[0]
    if width is not None and dim is not None and int(dim) != width:
        families = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
        raise DifffeatError(f"LoRA {str(path)!r} was trained for a model with {width}-wide text conditioning "
                            f"({families.get(width, 'another family')}) but {os.fspath(model)!r} has {dim}; use a LoRA "
                            "trained for this base model")
