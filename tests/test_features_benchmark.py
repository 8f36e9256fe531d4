"""The linear-probe feature benchmark (benchmarks/features_shapes.py) computes what it claims: its cached
training pixels and its folded, native-resolution logits equal the explicit upsample-concat-standardise-linear
computation, and the probe separates what is linearly separable."""

from __future__ import annotations

import numpy as np
import torch

import difffeat

from _helpers import load_benchmark


def _feats(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"coarse": torch.randn(n, 5, 8, 8, generator=g), "fine": torch.randn(n, 3, 16, 16, generator=g) * 3 + 1,
            "full": torch.randn(n, 2, 64, 64, generator=g)}


def test_training_pixels_and_folded_logits_match_the_explicit_computation():
    mod = load_benchmark("features_shapes")
    feats = _feats()
    y = np.random.default_rng(0).integers(0, 4, (3, 64, 64)).astype(np.uint8)
    data = mod.ProbeData(feats, y, pixels_per_image=50)
    names = ["coarse", "fine", "full"]
    dense = difffeat.upsample_concat(feats, size=(64, 64))  # [3, 10, 64, 64], the library's aggregation
    x_explicit = dense.flatten(2).transpose(1, 2)[torch.arange(3)[:, None], data.idx].reshape(-1, 10)
    x_cached = torch.cat([data.x(n).float() for n in names], dim=1)
    torch.testing.assert_close(x_cached, x_explicit, rtol=2e-3, atol=2e-3)  # cache is float16
    assert data.y.tolist() == torch.from_numpy(y.reshape(3, -1)).long()[torch.arange(3)[:, None], data.idx].reshape(-1).tolist()

    probe = mod.LinearProbe(4, steps=20).fit(data, names)
    explicit = probe.linear(((dense.permute(0, 2, 3, 1) - probe.mean) / probe.std)).permute(0, 3, 1, 2)
    torch.testing.assert_close(probe.logits(feats, slice(0, 3)), explicit, rtol=1e-4, atol=1e-4)


def test_probe_separates_separable_pixels_and_not_noise():
    mod = load_benchmark("features_shapes")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, (6, 64, 64)).astype(np.uint8)
    onehot = torch.from_numpy(np.eye(3, dtype=np.float32)[y]).permute(0, 3, 1, 2)  # [6, 3, 64, 64]
    informative = {"f": onehot + 0.1 * torch.randn(onehot.shape, generator=torch.Generator().manual_seed(0))}
    noise = {"f": torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
    train_rows, test_rows = slice(0, 4), slice(4, 6)

    def score(feats):
        train = mod.ProbeData({k: v[train_rows] for k, v in feats.items()}, y[train_rows], pixels_per_image=400)
        return mod.probe_miou(train, ["f"], {k: v[test_rows] for k, v in feats.items()}, y[test_rows], 3)

    assert score(informative) > 99.0
    assert score(noise) < 40.0  # chance for 3 balanced classes is ~20 mIoU


def test_greedy_selection_stops_when_no_activation_adds_enough():
    mod = load_benchmark("features_shapes")
    gains = {"a": 50.0, "b": 10.0, "c": 0.2}
    path = mod.greedy_selection(lambda sel: sum(gains[n] for n in sel), ["c", "b", "a"], max_picks=3, min_gain=0.5)
    assert path == [(["a"], 50.0), (["a", "b"], 60.0)]
