"""``manifest.json``: what produced an output folder, so a restart never mixes outputs of different runs.

The main process writes it; a restart compares ``kind``, ``model``, ``settings`` and ``dataset`` with the
stored manifest and refuses to continue when any differ (versions are recorded, not compared).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ManifestMismatchError
from ..io import write_json

__all__ = ["versions"]

MANIFEST = "manifest.json"
COMPARED = ("kind", "model", "settings", "dataset")


def versions() -> dict[str, str]:
    import diffusers
    import torch

    from ..version import __version__

    return {"difffeat": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


@dataclass
class Manifest:
    """What determines the outputs of a run (``kind`` is "extract" or "eval")."""

    kind: str
    model: str
    settings: dict[str, Any]
    dataset: dict[str, Any]
    versions: dict[str, str] = field(default_factory=versions)

    def to_json(self) -> dict[str, Any]:
        # a JSON round trip, so tuples/lists compare equal to what is read back
        return json.loads(json.dumps(asdict(self)))


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every compared entry that differs."""
    a = {k: v for key in COMPARED for k, v in _flatten(key, old.get(key)).items()}
    b = {k: v for key in COMPARED for k, v in _flatten(key, new.get(key)).items()}
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k] != b[k]]


def check_manifest(out_dir: str | os.PathLike, manifest: Manifest, overwrite: bool = False) -> dict[str, Any] | None:
    """Raise :class:`ManifestMismatchError` if ``out_dir`` holds a manifest that differs from ``manifest``
    (unless ``overwrite``). Returns the stored manifest, if any. Read-only: safe on every process."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestMismatchError(f"{str(path)!r} is unreadable ({exc}); use a new --out folder or pass --overwrite") from None
    if overwrite:
        return old
    diffs = diff_keys(old, manifest.to_json())
    if diffs:
        shown = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in diffs[:8])
        more = f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise ManifestMismatchError(
            f"the output folder {str(out_dir)!r} holds a {old.get('kind', '?')} run with different settings; "
            f"differing keys: {shown}{more}. Refusing to mix outputs: use a new --out folder, or pass --overwrite "
            "to recompute everything there with the new settings"
        )
    return old


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``out_dir/manifest.json`` atomically (main process only)."""
    return write_json(Path(out_dir) / MANIFEST, manifest.to_json())
