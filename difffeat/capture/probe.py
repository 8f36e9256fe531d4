"""The catalog of a loaded backbone with shapes: one forward on fake tensors through :class:`Capture`.

:mod:`difffeat.catalog` names the activations from the hook table and the module tree; this module, one
layer up, adds their per-image shapes (no real compute: :class:`torch._subclasses.fake_tensor.FakeTensorMode`)
and caches the result per backbone. What a family needs for such a forward (its conditioning as fakes, state
its denoiser keeps across forwards) its adapter provides: :meth:`~difffeat.backbones.Backbone.probe_conditioning`
and :meth:`~difffeat.backbones.Backbone.probe_context`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..catalog import ActivationInfo, Catalog, build_catalog, enumerate_activations
from ..hookpoints import load_table
from .session import Capture

if TYPE_CHECKING:
    from ..backbones.base import Backbone

__all__ = ["catalog_of", "probe_shapes"]

#: catalogs at the native resolution, per live backbone
_NATIVE: "weakref.WeakKeyDictionary[Backbone, Catalog]" = weakref.WeakKeyDictionary()


def catalog_of(backbone: "Backbone", probe_resolution: int | None = None) -> Catalog:
    """Every capturable activation of ``backbone`` with per-image shapes at ``probe_resolution`` px (square;
    default: the model's native resolution, cached per backbone)."""
    if probe_resolution is None and backbone in _NATIVE:
        return _NATIVE[backbone]
    res = probe_resolution or backbone.native_resolution
    infos = enumerate_activations(backbone.denoiser, load_table(backbone.hook_table))
    cat = build_catalog(backbone, probe_shapes(backbone, infos, (res, res)), (res, res))
    if probe_resolution is None:
        _NATIVE[backbone] = cat
    return cat


def probe_shapes(backbone: "Backbone", infos: list[ActivationInfo], size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of ``infos`` at pixel ``size`` (H, W), in forward order, from one fake-tensor forward."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    cond = backbone.probe_conditioning(mode)
    with mode:
        latents = torch.zeros(1, *backbone.latent_shape(*size), dtype=backbone.dtype, device=backbone.device)
        inputs = backbone.denoiser_inputs(latents, 1, cond, size)
        with backbone.probe_context(), Capture(backbone, infos, inputs, early_exit=False, shapes_only=True) as cap:
            backbone.denoise(inputs)
        return {name: tuple(int(s) for s in shape[1:]) for name, shape in cap.shapes.items()}
