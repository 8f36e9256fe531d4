"""Checks of user input that run before any expensive work: numeric ranges, output paths, the device.

Each raises a specific :class:`~difffeat.errors.DifffeatError` naming the option, the value and the fix. This
module imports no torch (except :func:`check_device`, which has to ask it), so argument errors answer at once.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .errors import DeviceError, InvalidOptionError, OutputPathError

__all__ = ["split_names", "check_number", "check_batch_size", "check_out_dir", "check_out_file", "check_device", "check_resolution", "MAX_RESOLUTION"]

#: the longest image side a run accepts (4096 px: the 16-megapixel input cap of difffeat.images)
MAX_RESOLUTION = 4096


def split_names(csv: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (the one place comma lists are parsed); lists pass through stripped."""
    if csv is None:
        return []
    items = csv.split(",") if isinstance(csv, str) else list(csv)
    return [s.strip() for s in items if s and s.strip()]


def check_number(option: str, value, lo: float | None = None, hi: float | None = None, integer: bool = False):
    """``value`` unchanged if it is a finite number in ``[lo, hi]`` (an integer when ``integer``); None passes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise InvalidOptionError(f"{option} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise InvalidOptionError(f"{option} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else f">= {lo:g}" if lo is not None else f"<= {hi:g}"
        raise InvalidOptionError(f"{option} must be {span}, got {value!r}")
    return value


def check_resolution(option: str, value: int | None, multiple: int = 8) -> int | None:
    """A long side in px: a multiple of ``multiple`` between 64 and :data:`MAX_RESOLUTION`; None passes."""
    check_number(option, value, 64, MAX_RESOLUTION, integer=True)
    if value is not None and value % multiple:
        raise InvalidOptionError(f"{option} must be a multiple of {multiple} px (the latent grid), got {value}; "
                                 f"try {max(64, round(value / multiple) * multiple)}")
    return value


def _writable_dir(folder: Path, what: str) -> None:
    """Create ``folder`` (and parents) if needed and check that a file can be created in it."""
    real = Path(os.path.realpath(folder))
    if real.parts[:2] in (("/", "proc"), ("/", "sys"), ("/", "dev")):
        raise OutputPathError(f"{what} {str(folder)!r} is under {'/'.join(real.parts[:2])[1:]}, a virtual file system; "
                              "choose a folder on disk")
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{what} {str(folder)!r} is an existing file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write to {what} {str(folder)!r} ({exc.strerror or exc}); choose a writable "
                              "folder") from None


def check_out_dir(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """An output folder that exists (created if needed) and is writable."""
    folder = Path(folder)
    _writable_dir(folder, what)
    return folder


def check_out_file(path: str | os.PathLike | None, what: str = "output file") -> Path | None:
    """An output file path whose folder is writable and that is not a folder itself; None passes."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'out.json')!r}")
    _writable_dir(path.parent, f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} {str(path)!r} exists and is not writable")
    return path


def check_device(device: str | None) -> str | None:
    """``device`` if this machine has it (``cuda``/``cuda:N``/``mps``/``cpu``); None passes (automatic)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {device!r} ({exc}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu or leave it out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) (0..{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return device


def check_batch_size(batch_size: int, chunk_size: int | None = None) -> int:
    """``batch_size`` unchanged if it is an integer in 1-4096 and, with ``chunk_size`` (``eval``: a batch is formed
    within one resumable chunk), at most ``chunk_size``; else a clear error naming the fix."""
    check_number("--batch-size", batch_size, 1, 4096, integer=True)
    if chunk_size is not None and batch_size > chunk_size:
        raise InvalidOptionError(f"--batch-size {batch_size} is larger than --chunk-size {chunk_size}: a batch is formed "
                                 f"within one resumable chunk; pass --chunk-size {batch_size} (or a multiple of it)")
    return batch_size
