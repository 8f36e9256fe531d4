"""The per-head diagnosis recomputes GOCA's head weights outside the attention; both computations agree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

import difffeat
from difffeat.segment.aggregation import goca_head_weights
from difffeat.shapes import world

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("goca_heads_shapes", ROOT / "benchmarks" / "goca_heads_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_head_contributions_reproduce_the_observers_goca_maps() -> None:
    mod = _module()
    backbone = difffeat.load("shapes", device="cpu", dtype="fp32")
    seg = difffeat.Segmenter(backbone, heads="goca")
    scene = world.sample("val", 3)
    classes = list(dict.fromkeys(scene.classes_present))
    obs = seg.observe(scene.image, classes)
    s = seg.settings
    inputs = backbone.prepare([obs.image], obs.layout.caption, s.t, s.seed, s.resolution)
    names = list(seg.cross_names)
    with torch.no_grad(), difffeat.Capture(backbone, names, inputs) as cap:
        backbone.denoise(inputs)
    text = inputs.kwargs["encoder_hidden_states"][0]
    for name in names:
        attn = backbone.denoiser.get_submodule(name.rsplit(".", 1)[0])
        probs = cap.activations[name][0]  # every head: [heads, HW, T]
        with torch.no_grad():
            o = mod.head_contributions(attn, probs, text)
        # the heads' contributions add up to the layer's output before the bias (independent check of o_n)
        out = backbone.denoiser.get_submodule(name.rsplit(".", 1)[0]).to_out[0]
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
    mod = _module()
    backbone = difffeat.load("shapes", device="cpu", dtype="fp32")
    seg = difffeat.Segmenter(backbone, heads="mean")
    scene = world.sample("val", 5)
    classes = list(dict.fromkeys(scene.classes_present))
    names = list(seg.cross_names)
    reference = seg.observe(scene.image, classes, everything=True)
    n_heads = backbone.denoiser.get_submodule(names[0].rsplit(".", 1)[0]).heads
    uniform = mod.observe(seg, scene.image, classes, {n: mod.FixedHeadWeights([1.0 / n_heads] * n_heads) for n in names})
    for name in reference.activations:  # every capture, cross maps included, equals the head-mean observation
        torch.testing.assert_close(uniform.activations[name], reference.activations[name], rtol=1e-5, atol=1e-6)
    inputs = backbone.prepare([reference.image], reference.layout.caption, seg.settings.t, seg.settings.seed, seg.settings.resolution)
    with torch.no_grad(), difffeat.Capture(backbone, names, inputs) as cap:
        backbone.denoise(inputs)
    second = mod.observe(seg, scene.image, classes, {n: mod.FixedHeadWeights([0.0, 1.0] + [0.0] * (n_heads - 2)) for n in names})
    for name in names:  # a one-hot weighting returns that head's own map
        torch.testing.assert_close(second.activations[name].reshape(cap.activations[name][0, 1].shape), cap.activations[name][0, 1].float(), rtol=1e-4, atol=1e-6)
    assert seg.decide(second).labels.shape == (64, 64)  # the unchanged decision code accepts the observation
