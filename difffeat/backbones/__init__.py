"""Backbone adapters, one per model family, and :func:`load`.

Adapters are discovered: every module of this package is imported here, and an adapter registers itself with
:func:`register_backbone`, so a new family is a new module (plus its hook table and data files) and no edit
of this file."""

import importlib
import pkgutil

from .base import Backbone, DenoiserInputs, TextSegment, check_timestep
from .layout import TokenLayout
from .loading import load, wrap_pipeline
from .registry import FAMILIES, adapter_for, register_backbone, registered_pipelines

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f".{_module}", __name__)  # registers the adapters it defines
del _module

# Backbone, DenoiserInputs, TextSegment, load and register_backbone are exported from the package facade
# (``difffeat.load`` ...); the imports above keep ``difffeat.backbones.load`` working.
__all__ = ["check_timestep", "wrap_pipeline", "FAMILIES", "adapter_for", "registered_pipelines"]
