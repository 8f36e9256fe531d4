"""Atomic file output: every file difffeat writes appears whole or not at all (temp file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_path", "save_features", "load_features", "write_json", "write_bytes"]


def _process_umask() -> int:
    """The process umask (read once, at import: ``os.umask`` can only be read by setting it, which is not
    safe while writer threads create files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``, on error removed.

    The file ends up with the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` less the
    umask), not the owner-only mode of the temporary file."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_features(path: str | os.PathLike, features: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Save ``{name: tensor}`` as safetensors (contiguous CPU copies), atomically. Metadata values are
    stored as JSON strings."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in features.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_features(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_bytes(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))
