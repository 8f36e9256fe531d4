"""difffeat: pretrained diffusion models as feature extractors and training-free segmenters."""

from __future__ import annotations

__version__ = "0.1.0"

from .backbones import Backbone, DenoiserInputs, load, register_backbone
from .capture import Capture
from .catalog import ActivationInfo, Catalog
from .features import ExtractedItem, FeatureExtractor, upsample_concat
from .presets import FeaturePreset, list_presets, load_preset
from .segment import SegmentationResult, Segmenter, SegmentSettings
from . import shift
from .errors import (
    DifffeatError,
    InvalidImageError,
    InvalidPromptError,
    InvalidTimestepError,
    ModelNotFoundError,
    UnknownActivationError,
    UnsupportedBackboneError,
)


def list_activations(model="shapes", probe_resolution: int | None = None) -> Catalog:
    """The :class:`Catalog` of every capturable activation of ``model`` (a Backbone or anything :func:`load`
    accepts), with shapes at ``probe_resolution`` (default: the model's native resolution)."""
    backbone = load(model)
    if probe_resolution is None:
        return backbone.catalog()
    from .catalog import build_catalog

    return build_catalog(backbone, probe_resolution)


__all__ = [
    "__version__",
    "load",
    "list_activations",
    "Backbone",
    "DenoiserInputs",
    "register_backbone",
    "Capture",
    "ActivationInfo",
    "Catalog",
    "FeatureExtractor",
    "ExtractedItem",
    "upsample_concat",
    "FeaturePreset",
    "Segmenter",
    "SegmentationResult",
    "SegmentSettings",
    "list_presets",
    "load_preset",
    "DifffeatError",
    "InvalidImageError",
    "InvalidPromptError",
    "InvalidTimestepError",
    "ModelNotFoundError",
    "UnknownActivationError",
    "UnsupportedBackboneError",
]
