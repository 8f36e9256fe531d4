"""difffeat: pretrained diffusion models as feature extractors and training-free segmenters."""

from __future__ import annotations

__version__ = "0.1.0"

from .backbones import Backbone, DenoiserInputs, load, register_backbone
from .capture import Capture
from .catalog import ActivationInfo, Catalog
from .errors import (
    DifffeatError,
    InvalidImageError,
    InvalidPromptError,
    InvalidTimestepError,
    ModelNotFoundError,
    UnknownActivationError,
    UnsupportedBackboneError,
)


def catalog(model, probe_resolution: int | None = None) -> Catalog:
    """Every capturable activation of ``model`` (a Backbone or anything :func:`load` accepts)."""
    backbone = load(model)
    if probe_resolution is None:
        return backbone.catalog()
    from .catalog import build_catalog

    return build_catalog(backbone, probe_resolution)


__all__ = [
    "__version__",
    "load",
    "catalog",
    "Backbone",
    "DenoiserInputs",
    "register_backbone",
    "Capture",
    "ActivationInfo",
    "Catalog",
    "DifffeatError",
    "InvalidImageError",
    "InvalidPromptError",
    "InvalidTimestepError",
    "ModelNotFoundError",
    "UnknownActivationError",
    "UnsupportedBackboneError",
]
