"""Reading and normalising input images.

Accepted inputs: a file path, a PIL image of any mode (RGB, RGBA, L, LA, P, CMYK, I;16, I, F...), a numpy
array ``[H, W]``, ``[H, W, 1|3|4]`` (uint8, uint16 or float in [0, 1]), or a torch tensor ``[3, H, W]`` /
``[H, W, 3]`` with floats in [0, 1]. Everything becomes an RGB PIL image; then :func:`resize_to_multiple`
fits it to a model's resolution and size multiple.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InvalidImageError

__all__ = ["ImageInput", "to_rgb", "verify_image_file", "loaded_size", "original_size", "resize_to_multiple", "to_tensor",
           "target_size", "MIN_SIDE", "MAX_PIXELS"]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

#: Smallest accepted side in pixels; below this an image holds too little to upsample meaningfully.
MIN_SIDE = 8
#: Inputs with more pixels than this are downscaled on load (with a warning) before anything else.
MAX_PIXELS = 4096 * 4096
#: ``PIL.Image.info`` key under which :func:`to_rgb` keeps the (width, height) of an input it downscaled
ORIGINAL_SIZE = "difffeat.original_size"
#: the largest image decoded at all (PIL's decompression-bomb error threshold, about 179 MP)
MAX_DECODE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

_ACCEPTED = (
    "accepted inputs: an image file (PNG, JPEG, WebP, BMP, TIFF...), a PIL image, a numpy array [H, W] or "
    "[H, W, 1|3|4], or a torch tensor [3, H, W] with values in [0, 1]"
)


def _check_path(p: Path) -> None:
    if not p.exists():
        raise InvalidImageError(f"image file not found: {str(p)!r}")
    if p.is_dir():
        raise InvalidImageError(f"{str(p)!r} is a folder, not an image file")
    if p.stat().st_size == 0:
        raise InvalidImageError(f"image file {str(p)!r} is empty (0 bytes)")


def _too_large(p: Path, exc: Exception) -> InvalidImageError:
    return InvalidImageError(
        f"image file {str(p)!r} is too large to decode ({exc}); difffeat reads images up to "
        f"{MAX_DECODE_PIXELS / 1e6:.0f} megapixels and downscales anything above {MAX_PIXELS / 1e6:.0f} MP. "
        "Downscale the file first"
    )


def _unreadable(p: Path, exc: Exception) -> InvalidImageError:
    return InvalidImageError(
        f"cannot read image file {str(p)!r} ({exc.__class__.__name__}: {exc}); the file is corrupt or not an "
        f"image. {_ACCEPTED}"
    )


def verify_image_file(path: str | os.PathLike) -> None:
    """Check, without decoding it in full, that ``path`` is an image file :func:`to_rgb` can read: it exists,
    is not empty, PIL identifies it and its data is whole (PIL's ``verify``: chunk checksums and the end of the
    stream for PNG; a JPEG, which ``verify`` does not check, is decoded at 1/8 scale, which finds truncation).
    Cheap enough to run on every input of a run before the model loads.

    Raises:
        InvalidImageError: missing, a folder, empty, too large, corrupt or truncated (the message names the file).
    """
    p = Path(path)
    _check_path(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
                else:
                    img.verify()
    except Image.DecompressionBombError as exc:
        raise _too_large(p, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _unreadable(p, exc) from None


def _open_file(path: str | os.PathLike) -> Image.Image:
    p = Path(path)
    _check_path(p)
    try:
        with warnings.catch_warnings():
            # PIL warns between its bomb limit and twice it; inputs that large are downscaled by to_rgb
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
            if img.width * img.height > MAX_PIXELS:
                img.draft("RGB", (img.width // 2, img.height // 2))  # JPEG: decode at a reduced scale
            img.load()
    except Image.DecompressionBombError as exc:
        raise _too_large(p, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(p, exc) from None
    return img


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InvalidImageError(f"unsupported array shape {tuple(arr.shape)}; {_ACCEPTED}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise InvalidImageError("image array contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise InvalidImageError(
                f"float image values must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; divide by 255 "
                "for 8-bit data"
            )
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
    else:
        raise InvalidImageError(f"unsupported array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(arr)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi, 0.0, 1.0)
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_rgb(image: ImageInput) -> Image.Image:
    """Any accepted input -> an RGB PIL image (alpha composited on white, 16-bit scaled to 8-bit); one of more
    than :data:`MAX_PIXELS` pixels is downscaled to about that many (:func:`loaded_size`), its own size kept for
    :func:`original_size`.

    Raises:
        InvalidImageError: unreadable/corrupt file, unsupported type or layout, or a side below ``MIN_SIDE``.
    """
    if isinstance(image, (str, os.PathLike)):
        img = _open_file(image)
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = _array_to_pil(image)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (3, 4):
            t = t.permute(1, 2, 0)
        img = _array_to_pil(t.detach().cpu().float().numpy() if t.is_floating_point() else t.detach().cpu().numpy())
    else:
        raise InvalidImageError(f"unsupported image type {type(image).__name__}; {_ACCEPTED}")
    w, h = img.size
    if w == 0 or h == 0:
        raise InvalidImageError(f"image has zero size ({w}x{h} px)")
    if min(w, h) < MIN_SIDE:
        raise InvalidImageError(f"image is {w}x{h} px; each side must be at least {MIN_SIDE} px")
    img = _pil_to_rgb(img)
    new = loaded_size((w, h))
    if new != (w, h):
        warnings.warn(f"image of {w}x{h} px downscaled to {new[0]}x{new[1]} px on load (outputs such as label maps "
                      "keep the input's size)", stacklevel=2)
        img = img.resize(new, Image.Resampling.LANCZOS)
        img.info[ORIGINAL_SIZE] = (w, h)
    return img


def loaded_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) an image of ``size`` has after :func:`to_rgb`: itself, or scaled down to about
    :data:`MAX_PIXELS` pixels (aspect kept) when larger."""
    w, h = size
    if w * h <= MAX_PIXELS:
        return (w, h)
    scale = math.sqrt(MAX_PIXELS / (w * h))
    return (max(MIN_SIDE, int(w * scale)), max(MIN_SIDE, int(h * scale)))


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the input an RGB image from :func:`to_rgb` was made from: larger than its own size
    when :func:`to_rgb` downscaled it (kept in ``image.info``), else its size. Outputs such as label maps are
    written at this size. The kept size counts only while the image still has the size :func:`to_rgb` gave it
    (PIL copies ``info`` into crops and resizes, which are other images)."""
    kept = image.info.get(ORIGINAL_SIZE)
    if kept is not None and loaded_size(tuple(kept)) == image.size:
        return tuple(kept)
    return image.size


def target_size(size: tuple[int, int], resolution: int, multiple: int, square: bool = False) -> tuple[int, int]:
    """(width, height) for an image of ``size`` fitted to ``resolution``.

    The long side becomes ``resolution`` and the aspect ratio is kept (``square=True``: both sides are
    ``resolution``); each side is then rounded to the nearest multiple of ``multiple`` (at least one multiple).
    """
    if square:
        w = h = resolution
    else:
        w0, h0 = size
        scale = resolution / max(w0, h0)
        w, h = w0 * scale, h0 * scale
    return (max(multiple, int(round(w / multiple)) * multiple), max(multiple, int(round(h / multiple)) * multiple))


def resize_to_multiple(image: Image.Image, resolution: int, multiple: int, square: bool = False) -> Image.Image:
    """Resize an RGB image per :func:`target_size` (bicubic; Lanczos when shrinking a lot)."""
    size = target_size(image.size, resolution, multiple, square)
    if size == image.size:
        return image
    shrink = size[0] * size[1] < image.size[0] * image.size[1] / 4
    method = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    return image.resize(size, method)


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB PIL images -> float tensor ``[B, 3, H, W]`` in [-1, 1] (the VAE's input range)."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise InvalidImageError(
            f"images of one batch must have the same size after resizing, got {sorted(sizes)}; pass square=True "
            "or batch images of the same aspect ratio"
        )
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)
