"""Attention maps are observed at torch's SDPA call, so they do not depend on how diffusers got there: the
attention backend (set per model, by the ``attention_backend()`` context), fused projections, or the legacy
processor path. A backend that never calls SDPA is a clear error before anything is computed."""

from __future__ import annotations

import pytest
import torch
from diffusers import attention_backend
from diffusers.models.attention_processor import AttnProcessor

import difffeat
from difffeat import Capture
from difffeat.errors import AttentionBackendError
from difffeat.testing import tiny_pipeline

from _helpers import attention_modules, backbone_for, random_image


def _maps(backbone, inputs, kinds=("cross-map", "self-map")):
    names = [a.name for a in difffeat.list_activations(backbone) if a.kind in kinds]
    with Capture(backbone, names, inputs, early_exit=False) as cap:
        backbone.denoise(inputs)
    return cap.activations


def _inputs(backbone):
    return backbone.prepare([random_image(64, 48)], "a photo of a cat", t=100)


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.numeric
@pytest.mark.parametrize("family", ["flux", "flux2", "qwenimage", "zimage"])
def test_maps_are_the_same_under_native_and_native_math_backends_set_either_way(tiny_pipes, family):
    backbone = backbone_for(tiny_pipes, family)
    inputs = _inputs(backbone)
    reference = _maps(backbone, inputs)
    with attention_backend("_native_math"):
        _assert_same(_maps(backbone, inputs), reference)
    with attention_backend("native"):  # set_attention_backend also changes the global default: restore it after
        backbone.denoiser.set_attention_backend("_native_math")
        try:
            _assert_same(_maps(backbone, inputs), reference)
        finally:
            backbone.denoiser.reset_attention_backend()


@pytest.mark.numeric
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_maps_are_the_same_with_fused_qkv_projections(family):
    plain = difffeat.load(tiny_pipeline(family), device="cpu", dtype="fp32")
    fused_pipe = tiny_pipeline(family)
    fused_pipe.transformer.fuse_qkv_projections()
    fused = difffeat.load(fused_pipe, device="cpu", dtype="fp32")
    for b in (plain, fused):
        b.max_sequence_length = 32
    assert any(hasattr(m, "to_qkv") for _, m in fused.denoiser.named_modules())
    assert not any(a.name.endswith(".attn.q") for a in difffeat.list_activations(fused))  # its to_q no longer runs
    assert any(a.name.endswith(".attn.attended_q") for a in difffeat.list_activations(fused))  # the attended query still exists
    inputs = _inputs(plain)
    _assert_same(_maps(fused, inputs), _maps(plain, inputs))


@pytest.mark.numeric
def test_legacy_processors_without_sdpa_give_the_same_maps(tiny_pipes):
    backbone = difffeat.load(tiny_pipeline("sd"), device="cpu", dtype="fp32")
    inputs = _inputs(backbone)
    reference = _maps(backbone, inputs)
    backbone.denoiser.set_attn_processor(AttnProcessor())  # computes attention with baddbmm + softmax, no SDPA
    _assert_same(_maps(backbone, inputs), reference)


def _no_observer_left(denoiser, hooks_before):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in denoiser.modules()) == hooks_before


#: the module that runs last in each denoiser (its output projection)
_LAST = {"zimage": "all_final_layer.2-1"}


@pytest.mark.parametrize("family", ["flux", "flux2", "zimage"])
def test_a_backend_without_sdpa_is_a_clear_error_naming_the_fix(tiny_pipes, family):
    backbone = backbone_for(tiny_pipes, family)
    inputs = _inputs(backbone)
    den = backbone.denoiser
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in den.modules())
    name = next(a.name for a in difffeat.list_activations(backbone) if a.kind == "cross-map")
    with attention_backend("native"):  # set_attention_backend also changes the global default: restore it after
        den.set_attention_backend("flex")
        try:
            with pytest.raises(AttentionBackendError, match=r"'flex'.*set_attention_backend\('native'\)"):
                Capture(backbone, [name], inputs).__enter__()  # refused before any forward
        finally:
            den.reset_attention_backend()
    assert _no_observer_left(den, hooks)
    calls = []
    probe = den.get_submodule(_LAST.get(family, "proj_out")).register_forward_hook(lambda *a: calls.append(1))
    try:
        with attention_backend("flex"):  # the global backend is only known when the layer runs
            with pytest.raises(AttentionBackendError, match="attention_backend"):
                with Capture(backbone, [name], inputs, early_exit=False):
                    backbone.denoise(inputs)
    finally:
        probe.remove()
    assert calls == []  # stopped at the first observed layer, before the output
    assert _no_observer_left(den, hooks)
    assert all(type(m.processor).__name__ != "Observer" for _, m in attention_modules(den))


@pytest.mark.numeric
def test_hunyuandit_maps_are_the_same_under_both_cpu_sdpa_kernels_and_fused_projections(tiny_pipes):
    """HunyuanAttnProcessor2_0 calls torch's SDPA itself (diffusers' dispatcher and its backends are not involved):
    maps are observed there whichever CPU kernel torch picks (flash vs math), and with fuse_qkv_projections()
    (FusedHunyuanAttnProcessor2_0, q/k/v from one projection)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backbone = backbone_for(tiny_pipes, "hunyuandit")
    assert not any(hasattr(m.processor, "_attention_backend") for _, m in attention_modules(backbone.denoiser))
    inputs = _inputs(backbone)
    reference = _maps(backbone, inputs)
    for kernel in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel([kernel]):
            _assert_same(_maps(backbone, inputs), reference)
    fused_pipe = tiny_pipeline("hunyuandit")
    fused_pipe.transformer.fuse_qkv_projections()
    fused = difffeat.load(fused_pipe, device="cpu", dtype="fp32")
    assert {type(m.processor).__name__ for _, m in attention_modules(fused.denoiser)} == {"FusedHunyuanAttnProcessor2_0"}
    _assert_same(_maps(fused, inputs), reference)
