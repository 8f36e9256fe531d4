"""Backbone registry: pipeline class -> adapter class. Lookup walks the pipeline's MRO, so subclasses of a
registered pipeline (and its img2img / ControlNet variants, when registered) find their adapter."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import DiffusionPipeline

from ..errors import UnsupportedBackboneError
from .base import Backbone

__all__ = ["adapter_named", "pipelines_of"]

_BY_PIPELINE: dict[str, type[Backbone]] = {}
#: family name -> adapter class
FAMILIES: dict[str, type[Backbone]] = {}


def register_backbone(*pipeline_class_names: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator: register an adapter for the named diffusers pipeline classes."""

    def deco(cls: type[Backbone]) -> type[Backbone]:
        for name in pipeline_class_names:
            _BY_PIPELINE[name] = cls
        FAMILIES[cls.family] = cls
        return cls

    return deco


def registered_pipelines() -> list[str]:
    return sorted(_BY_PIPELINE)


def pipelines_of(family: str) -> list[str]:
    """The diffusers pipeline class names registered for one family."""
    return sorted(name for name, cls in _BY_PIPELINE.items() if cls.family == family)


def adapter_named(pipeline_class_name: str) -> type[Backbone]:
    """The adapter class registered for a pipeline class name, or :class:`UnsupportedBackboneError`."""
    try:
        return _BY_PIPELINE[pipeline_class_name]
    except KeyError:
        raise UnsupportedBackboneError(
            f"no difffeat backbone supports pipeline class {pipeline_class_name}. Supported pipelines: "
            + ", ".join(registered_pipelines())
        ) from None


def adapter_for(pipeline: DiffusionPipeline) -> type[Backbone]:
    """The adapter class for a pipeline instance, or :class:`UnsupportedBackboneError`."""
    for klass in type(pipeline).__mro__:
        if klass.__name__ in _BY_PIPELINE:
            return _BY_PIPELINE[klass.__name__]
    raise UnsupportedBackboneError(
        f"no difffeat backbone supports pipeline class {type(pipeline).__name__}. Supported pipelines: "
        + ", ".join(registered_pipelines())
        + ". Load the checkpoint with one of these classes, or register an adapter with "
        "difffeat.backbones.register_backbone."
    )
