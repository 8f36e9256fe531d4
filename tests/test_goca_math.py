"""GOCA formulas checked against plain loop implementations on random tensors."""

from __future__ import annotations

import types

import pytest
import torch

from difffeat.capture.observer import AttentionTensors, attention_maps, attention_probs, head_mean
from difffeat.segment.aggregation import GocaHeadReducer, combine_layers, goca_head_weights, gram_break_even_rows, layer_weights
from difffeat.segment.rescale import class_scores, gaussian_blur, minmax, rescale_by_content
from difffeat.segment.selfmaps import propagate, resize_self_map

#: float results of different kernel paths compared within derived tolerances (`.ci/run` reruns these under a
#: second kernel set and one thread: `pytest -m numeric`)
pytestmark = pytest.mark.numeric


def _attention(b=2, h=4, nq=12, nk=7, d=5, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk))
    w_out = torch.randn(c, h * d, generator=g)
    attn = types.SimpleNamespace(to_out=[types.SimpleNamespace(weight=w_out)])
    return AttentionTensors(q, k, v, None, d**-0.5, image_keys=None, text_keys=slice(0, nk)), attn, w_out


def test_head_weights_sum_to_one_and_match_the_definition():
    o = torch.randn(2, 4, 10, 6)
    w = goca_head_weights(o)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 10))
    total = o.sum(1)
    for n in range(4):
        naive = (o[:, n] * total).sum(-1) / (total * total).sum(-1)
        torch.testing.assert_close(w[:, n], naive)
    assert (w < 0).any()  # not clamped: random contributions can oppose the total


def test_goca_reducer_equals_per_head_loop():
    tensors, attn, w_out = _attention()
    got = attention_probs(tensors, "cross", GocaHeadReducer(), attn)
    b, h, nq, d = tensors.q.shape
    expected = torch.zeros(b, nq, tensors.k.shape[2])
    for bi in range(b):
        probs = [torch.softmax(tensors.q[bi, n] @ tensors.k[bi, n].T * tensors.scale, -1) for n in range(h)]
        contrib = [probs[n] @ tensors.v[bi, n] @ w_out[:, n * d : (n + 1) * d].T for n in range(h)]
        total = sum(contrib)
        for i in range(nq):
            for n in range(h):
                w = torch.dot(contrib[n][i], total[i]) / torch.dot(total[i], total[i])
                expected[bi, i] += w * probs[n][i]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_chunking_does_not_change_maps():
    tensors, attn, _ = _attention(nq=33)
    whole = attention_probs(tensors, "cross", GocaHeadReducer(), attn)
    chunked = attention_probs(tensors, "cross", GocaHeadReducer(), attn, chunk_elements=2 * 4 * 7 * 5)
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(
        attention_probs(tensors, "cross", head_mean, attn), attention_probs(tensors, "cross", head_mean, attn, chunk_elements=1)
    )


def test_joint_attention_weights_use_all_keys_but_return_text_columns():
    tensors, attn, w_out = _attention(nk=10)
    tensors.image_keys, tensors.text_keys = slice(0, 6), slice(6, 10)
    got = attention_probs(tensors, "cross", GocaHeadReducer(), attn)
    assert got.shape[-1] == 4
    full = attention_probs(tensors, "all", GocaHeadReducer(), attn)
    torch.testing.assert_close(got, full[..., 6:])


@pytest.mark.parametrize("workers", [1, 2])
def test_cross_and_self_maps_of_one_call_from_one_pass_equal_separate_passes(workers):
    tensors, attn, _ = _attention(nq=23, nk=30, c=16)
    tensors.image_keys, tensors.text_keys = slice(0, 23), slice(23, 30)
    chunk = 2 * 4 * 30 * 4  # 4 rows a chunk: 6 chunks
    out_one, out_sep = torch.empty(2, 4, 23, 5), torch.empty(2, 4, 23, 5)
    cross, self_mean = attention_maps(tensors, [("cross", GocaHeadReducer()), ("self", head_mean)], attn, chunk,
                                      output_bhqd=out_one, workers=workers)
    assert torch.equal(cross, attention_probs(tensors, "cross", GocaHeadReducer(), attn, chunk, out_sep, workers=workers))
    assert torch.equal(self_mean, attention_probs(tensors, "self", head_mean, attn, chunk, workers=workers))
    assert torch.equal(out_one, out_sep)


def test_layer_weights_are_nonnegative_sum_to_one_and_match_a_loop():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, 8, 4, 4, generator=g)
    selfs = [torch.softmax(torch.randn(1, 16, 16, generator=g), -1), torch.softmax(torch.randn(1, 4, 4, generator=g), -1)]
    grids = [(4, 4), (2, 2)]
    w = layer_weights(ref, selfs, grids)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(1))
    f = ref[0].flatten(1).T  # [HW, C]
    p = torch.softmax(f @ f.T / 8**0.5, -1)
    scores = []
    for s, grid in zip(selfs, grids):
        big = resize_self_map(s, grid, (4, 4))[0]
        scores.append(sum(p[i, j] * big[i, j] for i in range(16) for j in range(16)))
    scores = torch.stack(scores).clamp_min(0)
    torch.testing.assert_close(w[0], scores / scores.sum())


def test_layer_weights_use_every_reference_channel():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(1, 6, 3, 3, generator=g)
    selfs = [torch.softmax(torch.randn(1, 9, 9, generator=g) * 3, -1) for _ in range(3)]
    w_all = layer_weights(ref, selfs, [(3, 3)] * 3)
    w_ch0 = layer_weights(ref[:, :1], selfs, [(3, 3)] * 3)
    assert not torch.allclose(w_all, w_ch0)


def test_resize_self_map_is_nearest_over_queries_and_keeps_row_mass():
    s = torch.softmax(torch.randn(1, 4, 4), -1)
    big = resize_self_map(s, (2, 2), (4, 4))
    assert big.shape == (1, 16, 16)
    # query pixel (r, c) of the 4x4 grid reads row (r//2, c//2) of the 2x2 grid
    for r in range(4):
        for c in range(4):
            src = (r // 2) * 2 + c // 2
            keys = big[0, r * 4 + c].reshape(4, 4)
            torch.testing.assert_close(keys.sum(), s[0, src].sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(resize_self_map(s, (2, 2), (2, 2)), s)


def test_combine_layers_renormalises_every_pixel_over_text():
    maps = [torch.rand(1, 16, 5), torch.rand(1, 4, 5)]
    a = combine_layers(maps, [(4, 4), (2, 2)], torch.tensor([[0.25, 0.75]]), (4, 4))
    torch.testing.assert_close(a.sum(1), torch.ones(1, 4, 4))
    single = combine_layers(maps[:1], [(4, 4)], torch.tensor([[1.0]]), (4, 4))
    naive = maps[0][0].T.reshape(5, 4, 4)
    torch.testing.assert_close(single[0], naive / naive.sum(0, keepdim=True))


def test_rescaling_divides_by_content_attention_and_minmax_bounds():
    a = torch.rand(1, 6, 4, 4)
    a = a / a.sum(1, keepdim=True)
    s = class_scores(a, [[1], [2, 3]])
    torch.testing.assert_close(s[:, 1], (a[:, 2] + a[:, 3]) / 2)
    r = rescale_by_content(s, a, [1, 2, 3])
    torch.testing.assert_close(r[:, 0], a[:, 1] / a[:, 1:4].sum(1))
    m = minmax(gaussian_blur(r))
    assert m.min() >= 0 and m.max() <= 1
    torch.testing.assert_close(m.amax(dim=(-2, -1)), torch.ones(1, 2))


def test_blur_preserves_constants_and_smooths():
    const = torch.full((1, 1, 8, 8), 3.0)
    torch.testing.assert_close(gaussian_blur(const), const)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1
    out = gaussian_blur(spike, 5, 1.1)
    assert out[0, 0, 4, 4] < 1 and out[0, 0, 4, 5] > 0 and abs(out.sum().item() - 1) < 1e-5


def test_propagation_is_a_matrix_power_then_minmax():
    gen = torch.Generator().manual_seed(0)  # unseeded, a draw with a narrow range failed the min-max tolerance
    x = torch.rand(1, 2, 3, 3, generator=gen)
    s = torch.softmax(torch.randn(1, 9, 9, generator=gen), -1)
    got = propagate(x, s, 3)
    flat = x[0].flatten(1).T
    naive = torch.linalg.matrix_power(s[0], 3) @ flat
    torch.testing.assert_close(got[0], minmax(naive.T.reshape(1, 2, 3, 3))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(propagate(x, s, 0), x)


def _two_product_bound(tensors: AttentionTensors, w_out: torch.Tensor) -> torch.Tensor:
    """Forward-error bound ``[B, nq, nk]`` of one float32 GOCA map, whichever form (``W_O^T (W_O x)`` or
    ``(W_O^T W_O) x``) gives ``back = W_O^T W_O x``: each is a sum over ``C + h d`` products, so
    ``|d back| <= g (|W_O|^T |W_O| |x|)`` with ``g = (C + h d + d + h) u``, ``u`` float32's unit roundoff (the
    ``d``-term dots and the ``h``-term norm included); the head weights ``w_n = dot_n / norm`` then move by
    ``(|d dot_n| + |w_n| |d norm|) / |norm|`` and the map by ``sum_n |d w_n| P_n`` plus the einsum's ``h u``
    share. Computed in float64 from the exact (float64) quantities."""
    b, h, nq, d = tensors.q.shape
    c = w_out.shape[0]
    u = torch.finfo(torch.float32).eps / 2
    g = (c + h * d + d + h) * u
    q, k, v, w = (x.double() for x in (tensors.q, tensors.k, tensors.v, w_out))
    p = torch.softmax(q @ k.transpose(-1, -2) * tensors.scale, -1)  # [B, h, nq, nk]
    x = (p @ v).transpose(1, 2).reshape(b, nq, h * d)  # [B, nq, h d]
    dots = ((x @ w.T @ w) * x).view(b, nq, h, d).sum(-1)  # [B, nq, h]
    norm = dots.sum(-1, keepdim=True)
    dd = g * ((x.abs() @ w.abs().T @ w.abs()) * x.abs()).view(b, nq, h, d).sum(-1)  # |d dot_n|
    dw = (dd + (dots / norm).abs() * dd.sum(-1, keepdim=True)) / norm.abs()  # [B, nq, h]
    wts = dots / norm
    return torch.einsum("bqh,bhqk->bqk", dw + h * u * wts.abs(), p)


def test_kept_gram_matches_the_per_call_two_product_form():
    # C = 16 channels, h d = 20: the Gram pays after 16 * 20 / (32 - 20) = 26.7 rows; a call has 2 x 12 = 24
    tensors, attn, w_out = _attention(c=16)
    kept = GocaHeadReducer()
    first = attention_probs(tensors, "cross", kept, attn, chunk_elements=2 * 4 * 7 * 3, workers=2)
    fresh = attention_probs(tensors, "cross", GocaHeadReducer(), attn, chunk_elements=2 * 4 * 7 * 3, workers=2)
    assert torch.equal(first, fresh)  # below the break-even rows: the same two products, the same kernels
    assert kept.kept_bytes() == 0
    second = attention_probs(tensors, "cross", kept, attn, chunk_elements=2 * 4 * 7 * 3, workers=2)
    assert kept.kept_bytes() == 20 * 20 * 4  # the Gram, formed once 48 rows >= 26.7
    third = attention_probs(tensors, "cross", kept, attn, chunk_elements=2 * 4 * 7 * 3, workers=2)
    assert torch.equal(second, third)  # the same Gram reused
    bound = _two_product_bound(tensors, w_out).float()
    assert ((second - fresh).abs() <= 2 * bound).all()  # each form within its bound of the exact map
    assert not torch.equal(bound, torch.zeros_like(bound))


def test_kept_gram_is_dropped_when_w_o_changes_in_place():
    tensors, attn, w_out = _attention(c=16, nq=30)  # 60 rows a call: the Gram at the first call
    kept = GocaHeadReducer()
    attention_probs(tensors, "cross", kept, attn)
    assert kept.kept_bytes() == 20 * 20 * 4
    w_out.add_(torch.randn(w_out.shape, generator=torch.Generator().manual_seed(5)))  # a new _version
    again = attention_probs(tensors, "cross", kept, attn)
    fresh = attention_probs(tensors, "cross", GocaHeadReducer(), attn)
    assert torch.equal(again, fresh)  # the new W_O's Gram, made as a fresh reducer makes it


def test_gram_break_even_rows():
    assert gram_break_even_rows(1536, 1536) == 1536
    assert gram_break_even_rows(16, 20) == pytest.approx(16 * 20 / 12)
    assert gram_break_even_rows(9, 20) == float("inf")  # h d >= 2 C: the two products are always cheaper
