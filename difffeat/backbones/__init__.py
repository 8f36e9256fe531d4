"""Backbone adapters, one per model family, and :func:`load`."""

from . import dit, flux2, gemma, qwenimage, unet  # noqa: F401  (registers the adapters)
from . import hunyuandit, zimage  # noqa: F401  (registers the adapters)
from .base import Backbone, DenoiserInputs, TextSegment, check_timestep
from .loading import load, wrap_pipeline
from .registry import FAMILIES, adapter_for, register_backbone, registered_pipelines

# Backbone, DenoiserInputs, TextSegment, load and register_backbone are exported from the package facade
# (``difffeat.load`` ...); the imports above keep ``difffeat.backbones.load`` working.
__all__ = ["check_timestep", "wrap_pipeline", "FAMILIES", "adapter_for", "registered_pipelines"]
