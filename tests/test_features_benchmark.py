"""The linear-probe feature benchmark (benchmarks/features_shapes.py): its greedy selection and the way it
feeds features to difffeat's probe (upsample_concat to the mask size) are what its README section states."""

from __future__ import annotations

import numpy as np
import torch

from _helpers import load_benchmark


def test_greedy_selection_stops_when_no_activation_adds_enough():
    mod = load_benchmark("features_shapes")
    gains = {"a": 50.0, "b": 10.0, "c": 0.2}
    path = mod.greedy_selection(lambda sel: sum(gains[n] for n in sel), ["c", "b", "a"], max_picks=3, min_gain=0.5)
    assert path == [(["a"], 50.0), (["a", "b"], 60.0)]


def test_probe_miou_uses_every_named_feature_at_mask_resolution():
    """Class information split across two features at different resolutions: either alone is partial, the
    pair (upsampled to 64x64 and concatenated) separates the classes."""
    mod = load_benchmark("features_shapes")
    rng = np.random.default_rng(0)
    y = np.zeros((8, 64, 64), np.uint8)
    for i in range(8):  # quadrant labels 0..3: bit 0 from the left/right half, bit 1 from the top/bottom half
        a, b = rng.integers(0, 2, 2)
        y[i, :32, :32], y[i, :32, 32:], y[i, 32:, :32], y[i, 32:, 32:] = a + 2 * b, (1 - a) + 2 * b, a + 2 * (1 - b), (1 - a) + 2 * (1 - b)
    yt = torch.from_numpy(y).long()
    lr = torch.nn.functional.avg_pool2d((yt % 2).float()[:, None], 8)  # [8, 1, 8, 8], exact per 8x8 cell
    tb = torch.nn.functional.avg_pool2d((yt // 2).float()[:, None], 4)  # [8, 1, 16, 16]
    feats = {"lr": lr, "tb": tb}
    one = mod.probe_miou(feats, y, feats, y, ["lr"], 4)
    both = mod.probe_miou(feats, y, feats, y, ["lr", "tb"], 4)
    assert both > 95.0 and one < 60.0
