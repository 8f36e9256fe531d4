"""Backbone adapters, one per model family, and :func:`load`."""

from . import dit, flux2, gemma, qwenimage, unet  # noqa: F401  (registers the adapters)
from . import hunyuandit, zimage  # noqa: F401  (registers the adapters)
from . import longcatimage  # noqa: F401  (registers the adapters)
from . import ovisimage  # noqa: F401  (registers the adapters)
from . import krea2  # noqa: F401  (registers the adapters)
from . import hunyuanimage  # noqa: F401  (registers the adapters)
from . import briafibo  # noqa: F401  (registers the adapters)
from . import ideogram4  # noqa: F401  (registers the adapters)
from . import cogview4  # noqa: F401  (registers the adapters)
from . import hidream  # noqa: F401  (registers the adapters)
from .base import Backbone, DenoiserInputs, TextSegment, check_timestep
from .layout import TokenLayout
from .loading import load, wrap_pipeline
from .registry import FAMILIES, adapter_for, register_backbone, registered_pipelines

__all__ = [
    "Backbone",
    "DenoiserInputs",
    "TextSegment",
    "TokenLayout",
    "check_timestep",
    "load",
    "wrap_pipeline",
    "FAMILIES",
    "adapter_for",
    "register_backbone",
    "registered_pipelines",
]
