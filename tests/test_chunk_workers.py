"""The observer's chunks spread over worker threads give the caller-thread path's maps and layer output (the
same single-threaded kernels on the same chunks), call reducers safely, and leave torch's thread setting alone;
GOCA's head weights from the heads' outputs equal the formula on the per-head contributions."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from difffeat.capture import AttentionTensors, attention_probs, head_mean, per_head
from difffeat.capture.attention_kernels import dense_linear
from difffeat.capture.chunk_workers import chunk_workers
from difffeat.segment.aggregation import GocaHeadReducer, goca_head_weights, goca_head_weights_from_outputs
from difffeat.segment.layerscores import LayerScoreStream
from difffeat.segment.selfmaps import SelfMapStream, resize_self_map

#: float results of different kernel paths compared within derived tolerances
pytestmark = pytest.mark.numeric

EPS = float(torch.finfo(torch.float32).eps)



def _tensors(nq: int, nk: int, heads: int = 4, d: int = 8, seed: int = 0, cross: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, d, generator=g) for n in (nq, nk, nk))
    w_out = torch.randn(heads * d + 3, heads * d, generator=g)
    attn = types.SimpleNamespace(to_out=[types.SimpleNamespace(weight=w_out)])
    keys = dict(image_keys=None, text_keys=slice(0, nk)) if cross else dict(image_keys=slice(0, nk), text_keys=None)
    return AttentionTensors(q, k, v, None, d**-0.5, **keys), attn


def _run(t: AttentionTensors, keys: str, reducer, attn, workers: int, chunk: int):
    out = torch.empty(t.q.shape[0], t.q.shape[2], t.q.shape[1], t.v.shape[-1]).transpose(1, 2)
    maps = attention_probs(t, keys, reducer, attn, chunk, output_bhqd=out, workers=workers)
    return maps, out


@pytest.mark.parametrize("reducer", [per_head, head_mean, GocaHeadReducer()], ids=["per-head", "head-mean", "goca"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_chunks_on_workers_equal_chunks_in_the_caller_bit_for_bit(one_thread, reducer, cross):
    t, attn = _tensors(37, 11 if cross else 37, cross=cross)
    keys = "cross" if cross else "self"
    chunk = 2 * 4 * t.k.shape[2] * 3  # 3 rows a chunk: 13 chunks of 37 rows
    ref_maps, ref_out = _run(t, keys, reducer, attn, 1, chunk)
    for workers in (2, 3):
        maps, out = _run(t, keys, reducer, attn, workers, chunk)
        assert torch.equal(maps, ref_maps)
        assert torch.equal(out, ref_out)


def test_self_map_stream_reduces_the_same_on_workers(one_thread):
    t, attn = _tensors(64, 64)  # an 8x8 grid
    results = []
    for workers in (1, 2):
        stream = SelfMapStream({"s": 2}, ["s"], mass_preserving=False, input_grid=(8, 8))
        reducer = stream.reducers()["s"]
        attention_probs(t, "self", reducer, attn, 2 * 4 * 64 * 5, workers=workers)
        results.append((stream.kept["s"], stream.refine_sum))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


#: the two-pass layer scores of a reference feature on an 8x8 grid: a weight map on P's grid, a finer one (rows of
#: U(S) formed from its chunks) and a coarser one (<U^T P, S>); refinement maps on two grids, summed at 16x16
LAYER_GRIDS = {"same": (8, 8), "fine": (16, 16), "coarse": (4, 4)}
REFINE = ("fine", "same")


def _layer_scores(workers: int, serialized: bool = False):
    """Scores and refinement mean of a :class:`LayerScoreStream` fed every map through :func:`attention_probs`
    in 2-row chunks (the same chunks at any ``workers``); ``serialized``: its reducers without ``thread_safe``,
    so the observer calls them one chunk at a time in row order (the path before they were marked)."""
    g = torch.Generator().manual_seed(7)
    ref = 3 * torch.randn(2, 4, 8, 8, generator=g)  # peaked P and maps: scores far from the uniform maps' ~1
    stream = LayerScoreStream(ref, LAYER_GRIDS, {n: LAYER_GRIDS[n] for n in REFINE}, (16, 16), first_channel=False,
                              mass_preserving=True)
    reducers = stream.reducers()
    maps = {}
    for i, (name, (h, w)) in enumerate(LAYER_GRIDS.items()):
        t, attn = _tensors(h * w, h * w, seed=10 + i)
        t.q.mul_(4)
        reducer = reducers[name]
        assert reducer.thread_safe
        if serialized:
            reducer = (lambda r: lambda probs, **kw: r(probs, **kw))(reducer)  # a plain function: not thread-safe
        attention_probs(t, "self", reducer, attn, 2 * 4 * h * w * 2, workers=workers)
        maps[name] = t
    scores, refine = stream.finish({})
    return scores, refine, ref, maps


def _direct_layer_scores(ref: torch.Tensor, maps: dict[str, AttentionTensors]):
    """``<P, U(S_m)>`` and the refinement mean in float64 from whole maps (resize_self_map, not the row/adjoint
    forms of the stream)."""
    f = ref.double().flatten(2).transpose(1, 2)
    p = torch.softmax(f @ f.transpose(1, 2) / f.shape[-1] ** 0.5, dim=-1)
    whole = {n: torch.softmax(t.q.double() @ t.k.double().transpose(-1, -2) * t.scale, dim=-1).mean(dim=1)
             for n, t in maps.items()}
    scores = torch.stack([(p * resize_self_map(whole[n], LAYER_GRIDS[n], (8, 8), True)).sum(dim=(1, 2))
                          for n in LAYER_GRIDS], dim=1)
    refine = sum(resize_self_map(whole[n], LAYER_GRIDS[n], (16, 16), True) for n in REFINE) / len(REFINE)
    return scores, refine, p, whole


def test_layer_scores_on_workers_equal_the_row_ordered_reduction_bit_for_bit(one_thread):
    """The same single-threaded kernels on the same chunks, the score parts added in row order: bit-equal to
    the reducers called one chunk at a time in row order and to the caller's thread."""
    want_scores, want_refine, *_ = _layer_scores(1)
    for workers, serialized in [(2, True), (2, False), (3, False)]:
        scores, refine, *_ = _layer_scores(workers, serialized)
        assert torch.equal(scores, want_scores), (workers, serialized)
        assert torch.equal(refine, want_refine), (workers, serialized)


def test_layer_scores_on_workers_equal_a_float64_computation(one_thread):
    scores, refine, ref, maps = _layer_scores(2)
    want_scores, want_refine, p, whole = _direct_layer_scores(ref, maps)
    # Every float32 factor is positive with a relative error of at most (products' and softmax sums' terms +
    # logit range) eps: q.k^T over d = 8 dims (8 |logit|_max), exp (the logit range), the normalising sum over the
    # keys (<= 256), the head mean (4), the bilinear key resize (4 taps); P likewise (C = 4, 64 keys); the chunk's
    # float32 sum of positive products adds its term count (<= 2 rows x 64). Bounds, not estimates.
    logit = max(float((t.q @ t.k.transpose(-1, -2)).abs().max()) * t.scale for t in maps.values())
    f = ref.flatten(2).transpose(1, 2)
    p_logit = float((f @ f.transpose(1, 2)).abs().max()) / 2
    per_factor = (8 * logit + 2 * logit + 256 + 4 + 4) * EPS
    rtol = per_factor + (4 * p_logit + 2 * p_logit + 64) * EPS + (2 * 64 + 3) * EPS  # + the float32 result
    torch.testing.assert_close(scores.double(), want_scores, rtol=rtol, atol=0)
    torch.testing.assert_close(refine.double(), want_refine, rtol=per_factor + 2 * EPS, atol=0)
    spread = want_scores.max(dim=1).values - want_scores.min(dim=1).values
    assert (spread > 20 * rtol * want_scores.max(dim=1).values).all()  # a bound that still tells the layers apart


def test_reducers_not_marked_thread_safe_run_one_at_a_time_in_row_order():
    t, attn = _tensors(40, 40)
    active, most, starts = [0], [0], []
    lock = threading.Lock()

    def slow_mean(probs_bhqk, *, rows, **_):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            starts.append(rows.start)
        time.sleep(0.002)
        with lock:
            active[0] -= 1
        return probs_bhqk.mean(dim=1)

    got = attention_probs(t, "self", slow_mean, attn, 2 * 4 * 40 * 2, workers=4)
    assert most[0] == 1
    assert starts == list(range(0, 40, 2))  # as the caller's thread would call it: a running sum sees the same order
    torch.testing.assert_close(got, attention_probs(t, "self", head_mean, attn, workers=1), rtol=0, atol=4 * EPS)


def test_a_worker_error_reaches_the_caller():
    t, attn = _tensors(40, 40)

    def broken(probs_bhqk, *, rows, **_):
        if rows.start >= 20:
            raise ValueError("reducer failed")
        return probs_bhqk.mean(dim=1)

    with pytest.raises(ValueError, match="reducer failed"):
        attention_probs(t, "self", broken, attn, 2 * 4 * 40 * 4, workers=2)


def test_workers_keep_the_callers_inference_mode_and_torch_thread_count():
    t, attn = _tensors(40, 40)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        maps, out = _run(t, "self", head_mean, attn, 2, 2 * 4 * 40 * 4)  # out made in inference mode
    assert torch.get_num_threads() == threads
    ref, ref_out = _run(t, "self", head_mean, attn, 1, 2 * 4 * 40 * 4)
    torch.testing.assert_close(maps, ref)
    torch.testing.assert_close(out, ref_out)


def test_workers_are_not_used_where_autograd_records_or_off_the_cpu(one_thread):
    x = torch.zeros(2, requires_grad=True)
    torch.set_num_threads(2)
    assert chunk_workers(torch.zeros(2)) == 2
    assert chunk_workers(x) == 1
    with torch.no_grad():
        assert chunk_workers(x) == 2
    assert chunk_workers(torch.zeros(2, device="meta")) == 1
    torch.set_num_threads(1)
    assert chunk_workers(torch.zeros(2)) == 1


@pytest.mark.parametrize("gram", [False, True])
def test_head_weights_from_outputs_equal_the_formula_on_contributions(gram):
    g = torch.Generator().manual_seed(2)
    b, h, q, d, c = 2, 4, 30, 8, 21
    out_bhqd = torch.randn(b, h, q, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, h * d, generator=g, dtype=torch.float64)
    expected = goca_head_weights(torch.einsum("bhqd,chd->bhqc", out_bhqd, w.view(c, h, d)))  # float64 reference
    got = goca_head_weights_from_outputs(out_bhqd.float().transpose(1, 2), w.float().view(c, h, d),
                                         (w.t() @ w).float() if gram else None)
    # dots <o_n, o> carry at most ~gamma_(h*d + c) of sum |o_n||o| (the float32 products and G's rounding);
    # dividing by ||o||^2 turns that into this bound on each weight
    o = torch.einsum("bhqd,chd->bhqc", out_bhqd, w.view(c, h, d))
    mag = (o.abs() * o.sum(1, keepdim=True).abs()).sum(-1)  # [B, h, q]
    norm = o.sum(1).pow(2).sum(-1).unsqueeze(1)
    n = h * d + c + 4
    tol = 4 * n * EPS * (mag / norm + mag.sum(1, keepdim=True) / norm * expected.abs())
    assert ((got.double() - expected).abs() <= tol).all()


def test_dense_linear_is_a_float32_product():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 50, 70, generator=g), torch.randn(40, 70, generator=g)
    exact = x.double() @ w.double().t()
    bound = 70 * EPS / (1 - 70 * EPS) * (x.abs().double() @ w.abs().double().t())
    with torch.no_grad():
        assert ((dense_linear(x, w).double() - exact).abs() <= bound).all()
    x.requires_grad_(True)
    assert ((dense_linear(x, w).detach().double() - exact).abs() <= bound).all()  # the autograd-capable fallback
