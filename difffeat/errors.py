"""Error types. Every error difffeat raises for bad input is a :class:`DifffeatError` whose message names
the problem and the fix; none of them should surface as a traceback from deep inside torch."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["LabelFileError", "MissingExtraError", "AttentionBackendError", "close_matches"]


class DifffeatError(Exception):
    """Base class of every error difffeat raises on purpose."""


class UnknownActivationError(DifffeatError, KeyError):
    """An activation name that the loaded model does not have."""

    def __init__(self, name: str, known: Iterable[str], hint: str = "") -> None:
        matches = close_matches(name, known)
        msg = f"unknown activation name {name!r}."
        if matches:
            msg += " Closest valid names: " + ", ".join(matches) + "."
        msg += " List every name with `difffeat catalog MODEL` or `difffeat.list_activations(model)`."
        if hint:
            msg += " " + hint
        self.name = name
        self.matches = matches
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0])


class UnsupportedBackboneError(DifffeatError, TypeError):
    """A pipeline (or model) class that no backbone adapter is registered for."""


class InvalidImageError(DifffeatError, ValueError):
    """An image that cannot be read or used (corrupt file, zero size, unsupported mode...)."""


class InvalidTimestepError(DifffeatError, ValueError):
    """A diffusion timestep outside the training range [0, 999]."""


class ModelNotFoundError(DifffeatError, FileNotFoundError):
    """A model path or hub id that cannot be loaded."""


class InvalidPromptError(DifffeatError, ValueError):
    """Prompts or class names that cannot be used (empty list, duplicates, truncated tokens...)."""


class ConfigError(DifffeatError, ValueError):
    """A preset or settings file that is missing or malformed."""


class LabelFileError(ConfigError):
    """A per-image label or caption file that is malformed, misses an image, or names an unknown class."""


class MissingExtraError(DifffeatError, ImportError):
    """An optional feature whose package is not installed; the message names the pip extra to install."""

class InvalidOptionError(DifffeatError, ValueError):
    """A numeric or named option outside its valid range (checked before any model loads)."""


class OutputPathError(DifffeatError, OSError):
    """An output path that cannot be written (an existing file where a folder is needed, no permission...)."""


class DatasetError(DifffeatError, ValueError):
    """An annotation file, label image or dataset folder that cannot be used (names the file and entry)."""


class DeviceError(DifffeatError, RuntimeError):
    """A device that this machine does not have (e.g. ``cuda`` without CUDA)."""


class ManifestMismatchError(DifffeatError):
    """The output folder holds results made with different settings."""


class AttentionBackendError(DifffeatError, RuntimeError):
    """Attention maps were asked of a layer whose attention backend cannot return them (flash, sage,
    xformers...): the message names the layer, its backend and how to switch to one that can."""


def close_matches(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` entries of ``known`` most similar to ``name`` (difflib ratio, then substring hits)."""
    known = list(known)
    matches = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if len(matches) < n:
        tail = name.split(".")[-1].split("-")[-1]
        for k in known:
            if len(matches) >= n:
                break
            if k not in matches and tail and k.endswith(tail) and name.split(".")[0] in k:
                matches.append(k)
    return matches
