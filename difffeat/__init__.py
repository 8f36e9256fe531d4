"""difffeat: pretrained diffusion models as feature extractors and training-free segmenters.

The public API is imported lazily (PEP 562): ``import difffeat`` costs no torch/diffusers import until a name
that needs them is used, so ``difffeat --help`` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    DatasetError,
    DeviceError,
    DifffeatError,
    InvalidImageError,
    InvalidOptionError,
    InvalidPromptError,
    InvalidTimestepError,
    ManifestMismatchError,
    ModelNotFoundError,
    OutputPathError,
    UnknownActivationError,
    UnsupportedBackboneError,
)
from .version import __version__

#: public name -> module that defines it
_API = {
    "load": "backbones",
    "Backbone": "backbones",
    "DenoiserInputs": "backbones",
    "TextSegment": "backbones",
    "TokenLayout": "backbones",
    "register_backbone": "backbones",
    "Capture": "capture",
    "catalog_of": "capture",
    "ActivationInfo": "catalog",
    "Catalog": "catalog",
    "FeatureExtractor": "features",
    "ExtractedItem": "features",
    "upsample_concat": "features",
    "FeaturePreset": "presets",
    "list_presets": "presets",
    "load_preset": "presets",
    "Segmenter": "segment",
    "SegmentationResult": "segment",
    "SegmentSettings": "segment",
    "check_class_words": "segment",
    "ClassVocabularyWarning": "segment",
    "trace": "tracing",
    "Trace": "tracing",
    "SCFG": "tracing",
    "open_benchmark": "evaluate.benchmarks",
    "list_benchmarks": "evaluate.benchmarks",
}
#: subpackages reachable as attributes (``difffeat.testing.tiny_pipeline`` after ``import difffeat``)
_SUBMODULES = {"shift", "segment", "evaluate", "runs", "testing", "capture", "catalog", "backbones", "features",
               "presets", "images", "io", "shapes", "demo", "tracing"}

if TYPE_CHECKING:
    from . import evaluate, runs, segment, shift, testing  # noqa: F401
    from .backbones import Backbone, DenoiserInputs, TextSegment, TokenLayout, load, register_backbone
    from .capture import Capture, catalog_of
    from .catalog import ActivationInfo, Catalog
    from .evaluate.benchmarks import list_benchmarks, open_benchmark
    from .features import ExtractedItem, FeatureExtractor, upsample_concat
    from .presets import FeaturePreset, list_presets, load_preset
    from .segment import ClassVocabularyWarning, SegmentationResult, SegmentSettings, Segmenter, check_class_words
    from .tracing import SCFG, Trace, trace


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'difffeat' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | _SUBMODULES)


def list_activations(
    model: Any = "shapes", probe_resolution: int | None = None, device: str | None = None, config: str | None = None
) -> "Catalog":
    """The :class:`Catalog` of every capturable activation of ``model`` (a Backbone or anything :func:`load`
    accepts), with shapes at ``probe_resolution`` px (default: the model's native resolution). ``config``: the
    architecture of a single-file checkpoint (see :func:`load`)."""
    from .backbones import load
    from .capture import catalog_of
    from .checks import check_resolution

    check_resolution("probe resolution", probe_resolution)
    return catalog_of(load(model, device=device, config=config), probe_resolution)


__all__ = [
    "__version__",
    "list_activations",
    *_API,
    "DifffeatError",
    "ConfigError",
    "DatasetError",
    "DeviceError",
    "InvalidImageError",
    "InvalidOptionError",
    "InvalidPromptError",
    "InvalidTimestepError",
    "ManifestMismatchError",
    "ModelNotFoundError",
    "OutputPathError",
    "UnknownActivationError",
    "UnsupportedBackboneError",
]
