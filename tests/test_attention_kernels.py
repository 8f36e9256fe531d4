"""The observer's fused-lse path (output and log-sum-exp from torch's CPU flash kernel, maps
``exp(q.k^T - lse)``) gives the explicit path's maps and layer output to float32 rounding, and the same labels."""

from __future__ import annotations

import functools

import pytest
import torch

import difffeat
from difffeat.capture import AttentionTensors, attention_maps, attention_probs, per_head
from difffeat.capture import session as capture_session
from difffeat.capture.attention_kernels import flash_output_and_lse, probs_from_lse

from _helpers import assert_labels_differ_only_at_ties

#: float results of different kernel paths compared within derived tolerances
pytestmark = pytest.mark.numeric

EPS = float(torch.finfo(torch.float32).eps)


def _gamma(n: int) -> float:
    """The classic bound on the relative rounding error of an n-term float32 sum or dot product."""
    return n * EPS / (1 - n * EPS)


def _tensors(nq: int, nk: int, bias: bool, seed: int = 0) -> AttentionTensors:
    g = torch.Generator().manual_seed(seed)
    h, d = 3, 8
    q, k, v = (torch.randn(2, h, n, d, generator=g) * 2 for n in (nq, nk, nk))
    b = None
    if bias:  # per-sample additive bias with masked keys, as packed joint layouts have
        b = torch.randn(2, 1, 1, nk, generator=g)
        b[0, ..., : nk // 3] = float("-inf")
    return AttentionTensors(q, k, v, b, d**-0.5, image_keys=slice(0, nk) if nq == nk else None,
                            text_keys=None if nq == nk else slice(0, nk))


def _reference(t: AttentionTensors):
    """float64 softmax(s Q K^T + B) and its product with V, computed independently of both paths."""
    logits = t.scale * t.q.double() @ t.k.double().transpose(-1, -2)
    if t.bias is not None:
        logits = logits + t.bias.double()
    p = torch.softmax(logits, dim=-1)
    return p, p @ t.v.double()


def _bounds(t: AttentionTensors, p64: torch.Tensor):
    """Elementwise error bounds of a float32 probability and output against float64.

    A logit carries at most ``gamma_d * s|q|.|k|`` (+ the scaling's eps), the log-sum-exp the largest logit error
    plus ``gamma_Nk`` (its sum, however blocked) and a few eps of its magnitude; ``p = exp(logit - lse)`` so p's
    relative error is at most their sum (+ exp's own few eps). The output ``sum_j p_j v_j`` adds ``gamma_Nk``
    relative to ``sum_j p_j |v_j|``."""
    d, nk = t.q.shape[-1], t.k.shape[-2]
    mags = t.scale * t.q.abs().double() @ t.k.abs().double().transpose(-1, -2)
    lse_mag = (p64.clamp_min(1e-300).log().neg() + 1).amax().item() + mags.amax().item()
    rel = 2 * (_gamma(d) + 2 * EPS) * mags.amax(dim=-1, keepdim=True) + _gamma(nk) + 8 * EPS * lse_mag + 8 * EPS
    p_tol = rel * p64
    o_tol = (rel + _gamma(nk)) * (p64 @ t.v.abs().double())
    return p_tol, o_tol


def _run(t: AttentionTensors, keys: str, fused_lse: bool, chunk_elements: int):
    out = torch.empty(*t.q.shape[:-1], t.v.shape[-1])
    maps = attention_probs(t, keys, per_head, None, chunk_elements, output_bhqd=out, fused_lse=fused_lse)
    return maps, out


@pytest.mark.parametrize("nq,nk,bias", [(40, 40, False), (40, 7, False), (33, 40, True)], ids=["self", "cross", "masked"])
@pytest.mark.parametrize("chunk_elements", [2**20, 3 * 2 * 40 * 5], ids=["one-chunk", "chunks"])
def test_fused_lse_maps_and_output_equal_float64_softmax_and_the_explicit_path(nq, nk, bias, chunk_elements):
    t = _tensors(nq, nk, bias)
    keys = "self" if nq == nk else "cross"
    p64, o64 = _reference(t)
    p_tol, o_tol = _bounds(t, p64)
    assert flash_output_and_lse(t.q, t.k, t.v, t.bias, t.scale) is not None  # the fused path really runs
    fast, fast_out = _run(t, keys, True, chunk_elements)
    slow, slow_out = _run(t, keys, False, chunk_elements)
    for got in (fast, slow):
        assert ((got.double() - p64).abs() <= p_tol).all()
    for got in (fast_out, slow_out):
        assert ((got.double() - o64).abs() <= o_tol).all()
    assert ((fast.double() - slow.double()).abs() <= 2 * p_tol).all()
    assert ((fast_out.double() - slow_out.double()).abs() <= 2 * o_tol).all()
    if bias:
        assert (fast[0, ..., : nk // 3] == 0).all()  # masked keys: exactly zero probability


def test_probs_from_lse_is_softmax_given_the_log_sum_exp():
    t = _tensors(16, 16, True)
    p64, _ = _reference(t)
    lse = torch.logsumexp(t.scale * t.q.double() @ t.k.double().transpose(-1, -2) + t.bias.double(), dim=-1)
    got = probs_from_lse(t.q * t.scale, t.k.transpose(-1, -2), t.bias, lse.float())
    assert ((got.double() - p64).abs() <= _bounds(t, p64)[0]).all()


def test_fully_masked_rows_fall_back_to_the_explicit_path():
    t = _tensors(12, 12, False)
    t.bias = torch.zeros(1, 1, 12, 12)
    t.bias[..., 3, :] = float("-inf")  # query row 3 attends to nothing
    assert flash_output_and_lse(t.q, t.k, t.v, t.bias, t.scale) is None
    fast, fast_out = _run(t, "self", True, 2**20)
    slow, slow_out = _run(t, "self", False, 2**20)
    torch.testing.assert_close(fast, slow, equal_nan=True, rtol=0, atol=0)  # the same kernels ran
    torch.testing.assert_close(fast_out, slow_out, equal_nan=True, rtol=0, atol=0)


def test_maps_that_need_no_output_take_the_explicit_path():
    t = _tensors(20, 20, False)
    a = attention_probs(t, "self", per_head, None, fused_lse=True)
    b = attention_probs(t, "self", per_head, None, fused_lse=False)
    assert torch.equal(a, b)  # no output wanted: the fused kernel would be pure extra cost


def test_shapes_model_labels_are_the_same_with_the_fused_lse_path(monkeypatch):
    from difffeat.shapes import world

    seg = difffeat.Segmenter("shapes")
    image, classes = world.sample("test", 1).image, ["circle", "square", "triangle"]
    slow = seg.decide(seg.observe(image, classes))  # the default: the explicit path
    monkeypatch.setattr(capture_session, "attention_maps", functools.partial(attention_maps, fused_lse=True))
    fast = seg.decide(seg.observe(image, classes))
    torch.testing.assert_close(fast.class_maps, slow.class_maps, rtol=1e-4, atol=1e-5)
    assert_labels_differ_only_at_ties(slow, fast)
