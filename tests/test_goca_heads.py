"""The per-head diagnosis recomputes GOCA's head weights outside the attention; both computations agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difffeat
from difffeat.segment.aggregation import goca_head_weights
from difffeat.shapes import world

from _helpers import load_benchmark

#: float results of different kernel paths compared within derived tolerances (`.ci/run` reruns these under a
#: second kernel set and one thread: `pytest -m numeric`)
pytestmark = pytest.mark.numeric


def _module():
    return load_benchmark("goca_heads_shapes")


def _setup(heads: str, scene_index: int):
    """The benchmark module, a Segmenter on the shipped model, and one val scene's image and classes."""
    seg = difffeat.Segmenter(difffeat.load("shapes", device="cpu", dtype="fp32"), heads=heads)
    scene = world.sample("val", scene_index)
    return _module(), seg, scene.image, list(dict.fromkeys(scene.classes_present))


def test_head_contributions_reproduce_the_observers_goca_maps() -> None:
    mod, seg, image, classes = _setup("goca", 3)
    backbone = seg.backbone
    obs = seg.observe(image, classes)
    _, _, heads, text = mod.per_head_maps(seg, image, classes)
    for name, probs in heads.items():  # every head: [heads, HW, T]
        attn = backbone.denoiser.get_submodule(name.rsplit(".", 1)[0])
        with torch.no_grad():
            o = mod.head_contributions(attn, probs, text)
        # the heads' contributions add up to the layer's output before the bias (independent check of o_n)
        out = attn.to_out[0]
        with torch.no_grad():
            v = attn.to_v(text)
            full = torch.einsum("hqt,thd->qhd", probs, v.view(v.shape[0], probs.shape[0], -1)).reshape(probs.shape[1], -1)
            torch.testing.assert_close(o.sum(0), full @ out.weight.T, rtol=1e-4, atol=1e-5)
        w = goca_head_weights(o[None])[0]
        mine = torch.einsum("hq,hqt->qt", w, probs.float())
        theirs = obs.activations[name].reshape(mine.shape)
        torch.testing.assert_close(mine, theirs.float(), rtol=1e-3, atol=1e-5)


def test_map_iou_thresholds_the_normalised_map() -> None:
    map_iou = _module().map_iou
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    m = torch.zeros(8, 8)
    m[:4, :4] = 1.0
    assert map_iou(m, mask) == 1.0
    assert map_iou(m * 5.0 + 2.0, mask) == 1.0  # min-max normalised: scale and offset do not matter
    assert map_iou(1.0 - m, mask) == 0.0
    m[:4, 4:] = 0.6  # above the 0.5 threshold: the prediction doubles
    assert map_iou(m, mask) == 0.5
    m[:4, 4:] = 0.4  # below it
    assert map_iou(m, mask) == 1.0
    coarse = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # a 2x2 map is upsampled to the mask's size first
    assert 0.8 < map_iou(coarse, mask) < 1.0


def test_fixed_head_weights_select_or_average_heads_inside_the_observer() -> None:
    """The public ``head_reducers`` option (used by the benchmark's supervised rows) against the per-head maps."""
    from difffeat.segment import FixedHeadWeights

    mod, seg, image, classes = _setup("mean", 5)
    backbone = seg.backbone
    names = list(seg.cross_names)
    reference = seg.observe(image, classes, everything=True)
    n_heads = backbone.denoiser.get_submodule(names[0].rsplit(".", 1)[0]).heads
    uniform = seg.observe(image, classes, everything=True, head_reducers={n: FixedHeadWeights([1.0 / n_heads] * n_heads) for n in names})
    assert uniform.heads == "custom" and reference.heads == "mean"
    for name in reference.activations:  # every capture, cross maps included, equals the head-mean observation
        torch.testing.assert_close(uniform.activations[name], reference.activations[name], rtol=1e-5, atol=1e-6)
    _, _, heads, _ = mod.per_head_maps(seg, image, classes)
    second = seg.observe(image, classes, head_reducers={n: FixedHeadWeights([0.0, 1.0] + [0.0] * (n_heads - 2)) for n in names})
    for name in names:  # a one-hot weighting returns that head's own map
        torch.testing.assert_close(second.activations[name].reshape(heads[name][1].shape), heads[name][1].float(), rtol=1e-4, atol=1e-6)
    goca = difffeat.Segmenter(backbone, heads="goca")
    assert goca.decide(second).labels.shape == (64, 64)  # a custom observation is decided under any heads setting
    one = seg.observe(image, classes, head_reducers={names[0]: FixedHeadWeights([0.0, 1.0] + [0.0] * (n_heads - 2))})
    torch.testing.assert_close(one.activations[names[0]], second.activations[names[0]])  # only the named layer changes
    torch.testing.assert_close(one.activations[names[1]], reference.activations[names[1]], rtol=1e-5, atol=1e-6)
