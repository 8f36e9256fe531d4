"""GPU paths: half precision, xformers, and every family on CUDA (marked ``gpu``; skipped without a CUDA device).

Run with ``python -m pytest -m gpu``. The reference for each check is the same computation in fp32 (on the
GPU, and on the CPU for the fp32 path itself), so these tests say how far half precision and the xformers
kernels move the library's outputs, not that they ran.
"""

from __future__ import annotations

import numpy as np
import pytest

import difffeat
import torch
from PIL import Image

from difffeat import Capture, FeatureExtractor, Segmenter, load
from difffeat.shapes.examples import read_examples

from _helpers import FAMILIES, random_image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FEATURES = ["up_blocks.0", "up_blocks.1", "up_blocks.2"]


def _examples() -> list[tuple[Image.Image, list[str]]]:
    return [(Image.open(e["path"]).convert("RGB"), e["classes_present"]) for e in read_examples()]


def _labels(backbone) -> list[np.ndarray]:
    seg = Segmenter(backbone)
    return [seg(image, classes).labels for image, classes in _examples()]


def _agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([(x == y).mean() for x, y in zip(a, b, strict=True)]))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def fp32_cuda_labels() -> list[np.ndarray]:
    return _labels(load("shapes", device="cuda", dtype="fp32", xformers=False))


def test_cuda_fp32_segmentation_matches_the_cpu(fp32_cuda_labels):
    cpu = _labels(load("shapes", device="cpu", dtype="fp32"))
    assert _agreement(fp32_cuda_labels, cpu) >= 0.99


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_segmentation_agrees_with_fp32(fp32_cuda_labels, dtype):
    backbone = load("shapes", device="cuda", dtype=dtype, xformers=False)
    assert backbone.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert _agreement(_labels(backbone), fp32_cuda_labels) >= 0.97


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_features_stay_close_to_fp32(dtype):
    images = [image for image, _ in _examples()]
    ref = FeatureExtractor(load("shapes", device="cuda", dtype="fp32", xformers=False), FEATURES)(images)
    half = FeatureExtractor(load("shapes", device="cuda", dtype=dtype, xformers=False), FEATURES)(images)
    tolerance = {"fp16": 0.02, "bf16": 0.08}[dtype]  # bf16 keeps 8 mantissa bits, fp16 11
    for name in FEATURES:
        assert half[name].dtype == torch.float32 and half[name].device.type == "cpu"  # out_dtype/out_device
        assert _rel_err(half[name], ref[name]) < tolerance, name


def _xformers_problem() -> str | None:
    """None when xformers runs here, else why not (not installed, or built for another torch/CUDA)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import xformers.ops

        q = torch.randn(1, 16, 2, 8, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        return None
    except Exception as exc:
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


XFORMERS_PROBLEM = _xformers_problem()


@pytest.mark.skipif(XFORMERS_PROBLEM is None, reason="xformers runs here (see the test below)")
def test_xformers_that_does_not_run_is_not_used_by_default_and_fails_clearly():
    pytest.importorskip("xformers")
    backbone = load("shapes", device="cuda", dtype="fp16")  # default: PyTorch attention, xformers not tried
    assert not any("XFormers" in type(p).__name__ for p in backbone.denoiser.attn_processors.values())
    with pytest.raises(ValueError, match="xformers=True but xformers does not run here"):
        load("shapes", device="cuda", dtype="fp16", xformers=True)


@pytest.mark.skipif(XFORMERS_PROBLEM is not None, reason=f"needs working xformers ({XFORMERS_PROBLEM})")
def test_xformers_processors_are_observed_and_restored(fp32_cuda_labels):
    backbone = load("shapes", device="cuda", dtype="fp32", xformers=True)
    kinds = {type(p).__name__ for p in backbone.denoiser.attn_processors.values()}
    assert kinds == {"XFormersAttnProcessor"}
    assert _agreement(_labels(backbone), fp32_cuda_labels) >= 0.99

    # a capture swaps observers in and gives the xformers processors back, also when the forward raises
    image, _ = _examples()[0]
    inputs = backbone.prepare([image], "a photo of circle, square", t=50, seed=0)
    names = [a.name for a in difffeat.list_activations(backbone) if a.kind == "cross-map"]
    with pytest.raises(RuntimeError, match="boom"):
        with Capture(backbone, names, inputs, early_exit=False):
            raise RuntimeError("boom")
    assert {type(p).__name__ for p in backbone.denoiser.attn_processors.values()} == {"XFormersAttnProcessor"}

    # the observed probabilities reproduce the layer's output that xformers computed: P @ V == to_out's input
    module = difffeat.list_activations(backbone).resolve([names[0]])[0].module
    attn = backbone.denoiser.get_submodule(module)
    seen: dict[str, object] = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("ctx", k["encoder_hidden_states"]), with_kwargs=True)
    h2 = attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("out_in", a[0]))
    try:
        with Capture(backbone, [names[0]], inputs, early_exit=False) as cap:
            backbone.denoise(inputs)
    finally:
        h1.remove()
        h2.remove()
    p = cap.activations[names[0]].double()  # [B, heads, Nq, T]
    b, heads = p.shape[:2]
    v = attn.to_v(seen["ctx"])
    v = v.view(b, -1, heads, v.shape[-1] // heads).transpose(1, 2).double()
    out = torch.matmul(p, v).transpose(1, 2).reshape(b, p.shape[2], -1)
    assert _rel_err(out.cpu(), seen["out_in"].cpu()) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_segments_and_extracts_in_fp16_on_cuda(family):
    from difffeat.testing import tiny_pipeline

    backbone = load(tiny_pipeline(family), device="cuda", dtype="fp16", xformers=False)
    assert backbone.dtype == torch.float16 and backbone.denoiser.device.type == "cuda"
    result = Segmenter(backbone)(random_image(48, 80), ["cat", "dog"])
    assert result.labels.shape == (48, 80)
    assert torch.isfinite(result.class_maps).all()
    names = [a.name for a in difffeat.list_activations(backbone)][:6]
    feats = FeatureExtractor(backbone, names)(random_image(64, 64))
    for name, value in feats.items():
        assert torch.isfinite(value).all(), name
