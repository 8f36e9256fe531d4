"""What adapters need for the catalog's shape probe (:func:`difffeat.capture.probe_shapes`: one forward on
fake tensors): the empty prompt's conditioning as fake tensors, and the restoring of state a denoiser keeps
across forwards. Each adapter opts in through :meth:`~difffeat.backbones.Backbone.probe_conditioning` and
:meth:`~difffeat.backbones.Backbone.probe_context`; the probe itself knows no family."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensor, FakeTensorMode

if TYPE_CHECKING:
    from .base import Backbone

__all__ = ["encode_for_probe", "fake_conditioning", "clearing_method_caches"]


def encode_for_probe(backbone: "Backbone", mode: FakeTensorMode, *, real: bool = False) -> dict[str, Any]:
    """The empty prompt's conditioning for a fake-tensor forward under ``mode``: the text encoders run on fake
    tensors (no compute), or for real where their output length depends on the data (``real=True`` forces
    it); real integer/bool tensors become constant fakes (:func:`fake_conditioning`)."""
    cond = None
    if not real:
        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                cond = backbone.encode_prompt([""])
        except DynamicOutputShapeException:  # text encoders whose output length depends on the data (masks)
            cond = None
    if cond is None:
        cond = backbone.encode_prompt([""])
    return fake_conditioning(mode, cond)


def fake_conditioning(mode: FakeTensorMode, cond: dict) -> dict:
    """The real integer/bool tensors of a conditioning dict (text masks) as *constant* fake tensors of ``mode``:
    their values stay known, so a denoiser that reads them on the host (``tolist()`` of a mask) runs under
    fake tensors. Other entries are returned unchanged. Call it outside ``mode``'s context."""

    def convert(x: Any) -> Any:
        real = isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) and x.device.type != "meta"
        if real and not (x.is_floating_point() or x.is_complex()):
            return mode.fake_tensor_converter.from_real_tensor(mode, x.clone(), make_constant=True)  # a view's fake would lose the constant
        return x

    return {k: convert(v) for k, v in cond.items()}


@contextmanager
def clearing_method_caches(denoiser: torch.nn.Module) -> Iterator[None]:
    """On exit, empty the ``functools.lru_cache`` of every method of the denoiser's module classes (directly or
    inside diffusers' ``lru_cache_unless_export`` wrapper): a fake-tensor forward would otherwise leave fake
    tensors there (frequencies cached per grid size) for the next real forward to find."""
    try:
        yield
    finally:
        for cls in {type(m) for m in denoiser.modules()}:
            for fn in vars(cls).values():
                for obj in (fn, *(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))):
                    if callable(getattr(obj, "cache_clear", None)):
                        obj.cache_clear()
