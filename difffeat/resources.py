"""Locating the data folders shipped with difffeat (hook tables, configs, weights, examples).

In a source checkout they are the repository's top-level ``hooks/`` and ``configs/`` folders; in an
installed wheel they are package data under ``difffeat/_data/``. Nothing here ever reads ``shared/``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

__all__ = ["data_dir", "package_dir"]

_PKG = Path(__file__).resolve().parent


def package_dir() -> Path:
    return _PKG


@lru_cache(maxsize=None)
def data_dir(name: str) -> Path:
    """Folder of shipped data ``name`` ("hooks" or "configs")."""
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"difffeat data folder {name!r} not found (looked in {_PKG / '_data' / name} and {_PKG.parent / name}); "
        "the installation is incomplete: reinstall difffeat"
    )
