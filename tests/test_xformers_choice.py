"""load() leaves attention on PyTorch SDPA unless xformers=True is asked for: the attention maps of
dispatcher-style families (FLUX, SD3.5, Qwen-Image...) are only observable at torch's SDPA. The decision is
checked here without a GPU (a CUDA device object needs no GPU; enabling is recorded, not run)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import difffeat
from difffeat.backbones import loading
from difffeat.backbones.loading import xformers_wanted
from difffeat.testing import tiny_pipeline

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("requested", [None, False])
def test_xformers_is_off_unless_asked_even_on_cuda_with_xformers_installed(requested):
    assert xformers_wanted(requested, CUDA, installed=True) is False


def test_xformers_true_needs_cuda_and_xformers():
    assert xformers_wanted(True, CUDA, installed=True) is True
    with pytest.raises(ValueError, match="CUDA"):
        xformers_wanted(True, CPU, installed=True)
    with pytest.raises(ValueError, match=r"difffeat\[gpu\]"):
        xformers_wanted(True, CUDA, installed=False)


@pytest.fixture
def xformers_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else real(name, *a))


def _recording(backbone, monkeypatch) -> list[bool]:
    calls: list[bool] = []
    monkeypatch.setattr(backbone.pipeline, "enable_xformers_memory_efficient_attention", lambda: calls.append(True))
    return calls


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_default_never_enables_xformers(family, xformers_installed, monkeypatch):
    backbone = difffeat.load(tiny_pipeline(family))
    calls = _recording(backbone, monkeypatch)
    loading._configure_attention(backbone, CUDA, None)
    assert calls == []


def test_xformers_true_on_a_dispatcher_family_enables_it_and_warns_that_maps_are_lost(xformers_installed, monkeypatch):
    backbone = difffeat.load(tiny_pipeline("flux"))
    calls = _recording(backbone, monkeypatch)
    with pytest.warns(UserWarning, match="attention maps cannot be captured"):
        loading._configure_attention(backbone, CUDA, True)
    assert calls == [True]


def test_xformers_true_on_a_legacy_processor_family_enables_it_silently(xformers_installed, monkeypatch, recwarn):
    backbone = difffeat.load(tiny_pipeline("sd"))  # AttnProcessor2_0 -> XFormersAttnProcessor keeps an observer
    calls = _recording(backbone, monkeypatch)
    loading._configure_attention(backbone, CUDA, True)
    assert calls == [True]
    assert not [w for w in recwarn if "xformers" in str(w.message)]
