"""The catalog of a loaded backbone with shapes: one forward on fake tensors through :class:`Capture`.

:mod:`difffeat.catalog` names the activations from the hook table and the module tree; this module, one
layer up, adds their per-image shapes (no real compute: :class:`torch._subclasses.fake_tensor.FakeTensorMode`)
and caches the result per backbone.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensor, FakeTensorMode

from ..catalog import ActivationInfo, Catalog, build_catalog, enumerate_activations
from ..hookpoints import load_table
from .session import Capture

if TYPE_CHECKING:
    from ..backbones.base import Backbone

__all__ = ["catalog_of", "probe_shapes", "fake_conditioning"]

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
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            cond = backbone.encode_prompt([""])
    except DynamicOutputShapeException:  # text encoders whose output length depends on the data (masks)
        cond = backbone.encode_prompt([""])
    try:
        return _fake_forward_shapes(backbone, infos, size, cond)
    except DataDependentOutputException:  # the denoiser reads its conditioning on the host (Lumina 2's text mask)
        return _fake_forward_shapes(backbone, infos, size, backbone.encode_prompt([""]))


def _fake_forward_shapes(backbone: "Backbone", infos: list[ActivationInfo], size: tuple[int, int], cond: dict) -> dict[str, tuple[int, ...]]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    cond = fake_conditioning(mode, cond)
    with mode:
        latents = torch.zeros(1, *backbone.latent_shape(*size), dtype=backbone.dtype, device=backbone.device)
        inputs = backbone.denoiser_inputs(latents, 1, cond, size)
        try:
            with backbone.fake_forward_guard(), Capture(backbone, infos, inputs, early_exit=False, shapes_only=True) as cap:
                backbone.denoise(inputs)
        finally:
            _clear_method_caches(backbone.denoiser)
        return {name: tuple(int(s) for s in shape[1:]) for name, shape in cap.shapes.items()}


def fake_conditioning(mode: FakeTensorMode, cond: dict) -> dict:
    """The real integer/bool tensors of a conditioning dict (text masks) as *constant* fake tensors of ``mode``:
    their values stay known, so a denoiser that reads them on the host (Lumina 2 turns its text mask into
    per-sample lengths with ``tolist()``) runs under fake tensors. Other entries are returned unchanged. Call it
    outside ``mode``'s context."""

    def convert(x: Any) -> Any:
        real = isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) and x.device.type != "meta"
        if real and not (x.is_floating_point() or x.is_complex()):
            return mode.fake_tensor_converter.from_real_tensor(mode, x.clone(), make_constant=True)  # a view's fake would lose the constant
        return x

    return {k: convert(v) for k, v in cond.items()}


def _clear_method_caches(denoiser: torch.nn.Module) -> None:
    """Empty the ``functools.lru_cache`` of every method of the denoiser's module classes (directly or inside
    diffusers' ``lru_cache_unless_export`` wrapper): a fake-tensor forward would otherwise leave fake tensors
    there (Qwen-Image caches its RoPE frequencies per grid size) for the next real forward to find."""
    for cls in {type(m) for m in denoiser.modules()}:
        for fn in vars(cls).values():
            for obj in (fn, *(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))):
                if callable(getattr(obj, "cache_clear", None)):
                    obj.cache_clear()
