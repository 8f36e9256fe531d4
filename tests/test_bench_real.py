"""The real-architecture benchmark suites run end to end (here on the embedded model instead of a real-size
one, so the test is fast) and report ratios against their own baselines."""

from __future__ import annotations

import pytest

import difffeat
from difffeat.devtools import bench_real


@pytest.fixture
def shapes_backbone(monkeypatch):
    backbone = difffeat.load("shapes")
    monkeypatch.setattr(bench_real, "_backbone", lambda *a, **k: backbone)
    return backbone


def test_goca_suite_splits_the_time_and_counts_kept_maps(shapes_backbone):
    out = bench_real.goca_real("sd15", resolution=64, repeats=1, memory=False)
    assert set(out["vs_bare_forward"]) == {"prepare", "observed", "observed_two_pass", "decide", "end_to_end"}
    assert out["auto_passes"] == "one-pass"  # a 64 px shapes image keeps a few MiB of maps
    assert all(v > 0 for v in out["vs_bare_forward"].values())
    # every head's maps are at least as large as the head-aggregated ones the observer keeps
    assert out["kept_maps_every_head_mb"] > 0 and out["kept_maps_mb"] > 0
    assert "load_average_1_5_15" in out


def test_features_throughput_and_vae_suites_run(shapes_backbone):
    feats = bench_real.features_real("shapes", resolution=64, repeats=1)  # every preset named shapes-*
    assert sorted(feats["presets"]) == ["shapes-legacy", "shapes-practical"]
    for p in feats["presets"].values():
        assert {"forward_full", "forward_early_exit", "end_to_end"} == set(p["vs_bare_forward"])
    early = bench_real.early_exit_real("sd15", resolution=64, repeats=1)
    assert list(early["vs_bare_forward"]) == ["up_blocks.0", "up_blocks.1", "up_blocks.2"]
    flops = list(early["flops_vs_bare_forward"].values())
    assert 0 < flops[0] < flops[1] < flops[2] <= 1.0  # each later exit runs more of the forward
    tp = bench_real.throughput_real("sd15", resolution=64, repeats=1, batch_sizes=(1, 2))
    assert tp["vs_batch_1"]["1"] == 1.0 and tp["images"] == 2


def test_vae_suite_measures_the_bf16_error_on_features_named_by_aliases(shapes_backbone, monkeypatch):
    from types import SimpleNamespace

    aliases = ("up-level1-repeat1-res-out", "up_blocks.2.attentions.0")  # sd15-practical names features so
    monkeypatch.setattr(difffeat.presets, "load_preset", lambda name: SimpleNamespace(features=aliases))
    vae = bench_real.vae_real("sd15", resolution=64, repeats=1)
    bf16 = vae["encode_dtype"]["bfloat16"]
    assert 0 < bf16["latent_relative_error"] < 0.1  # reduced precision changes the latents, a little
    assert set(bf16["feature_relative_error"]) == {"up_blocks.1.resnets.1", "up_blocks.2.attentions.0"}


def test_accounting_counts_sd15_blocks_and_map_sizes():
    out = bench_real.accounting_real("sd15", resolution=512)
    grids = out["per_grid"]
    # SD1.5: 16 transformer blocks, 5 at 64x64 (8 heads), 5 at 32x32, 5 at 16x16, 1 (mid) at 8x8
    assert {g: v["blocks"] for g, v in grids.items()} == {"64x64": 5, "32x32": 5, "16x16": 5, "8x8": 1}
    assert grids["64x64"]["self_map_mb"] == 4096**2 * 4 / 2**20 and grids["64x64"]["heads"] == 8
    assert out["kept_maps_every_head_mb"] == pytest.approx(8 * out["kept_maps_full_self_mb"])  # 8 heads everywhere
    # reduced during the forward (reference up_blocks.2 at 32x32): the 64x64 blocks keep a 32x32 map, the others
    # theirs, plus one 64x64 refinement sum; every figure in fp32 MiB
    mib = lambda side: (side * side) ** 2 * 4 / 2**20  # noqa: E731
    selfs = 5 * mib(32) + 5 * mib(32) + 5 * mib(16) + mib(8)
    assert out["reference_grid"] == "32x32" and out["refine_sum_mb"] == mib(64)
    ref_feature = 640 * 32 * 32 * 4 / 2**20  # the reference query (up_blocks.2's attn2.q, 640 channels)
    assert out["kept_maps_mb"] == pytest.approx(out["cross_maps_only_mb"] + selfs + mib(64) + ref_feature, abs=0.1)
    # two passes: cross maps, the 64x64 refinement sum, U^T P at 16x16 and 8x8 (coarser than P's 32x32), the
    # reference tokens (channel 0); the first pass stops before most of the up path
    assert out["kept_maps_two_pass_mb"] == pytest.approx(out["cross_maps_only_mb"] + mib(64) + mib(16) + mib(8), abs=0.1)
    assert out["auto_passes"] == "one-pass" and 0.3 < out["first_pass_flops_vs_bare"] < 0.9
    assert out["kept_maps_full_self_mb"] == pytest.approx(out["cross_maps_only_mb"] + 5 * (mib(64) + mib(32) + mib(16)) + mib(8), abs=0.5)


def test_readme_real_scale_table_is_rendered_from_the_committed_json():
    from _helpers import load_benchmark

    assert load_benchmark("real_scale_readme").main(["--check"]) == 0, "run python benchmarks/real_scale_readme.py"


def test_forward_flops_counts_matmuls_and_cpu_attention_by_hand():
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(3, 5), torch.randn(7, 5)
    assert bench_real.forward_flops(lambda: F.linear(x, w)) == 2 * 3 * 5 * 7
    q = k = v = torch.randn(2, 4, 16, 8)  # [B, heads, tokens, dim]
    # q k^T and (softmax) v: two [16 x 8] x [8 x 16]-sized products per batch and head
    assert bench_real.forward_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * 2 * 4 * 16 * 16 * 8)
