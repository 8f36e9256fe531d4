"""The two-pass (bounded-memory) observation gives the one-pass results: the same cross maps, the layer scores
``<P, U(S_m)>`` to float rounding (checked against a direct float64 computation from the whole maps), the same
refinement mean and labels; its early exit leaves no hook behind; ``memory="auto"`` picks it from the accounting
of :mod:`difffeat.segment.memory`, which matches what each observation really keeps."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import difffeat
from difffeat.errors import ConfigError, InvalidOptionError
from difffeat.segment.memory import MapGeometry, choose_passes, maps_kept_mb
from difffeat.segment.selfmaps import TargetRows, grid_of, resize_keys, resize_keys_adjoint, resize_self_map, resize_self_map_adjoint

from _helpers import random_image

#: float results of different kernel paths compared within derived tolerances (`.ci/run` reruns these under a
#: second kernel set and one thread: `pytest -m numeric`)
pytestmark = [pytest.mark.numeric, pytest.mark.filterwarnings("ignore:.*lacks the configured refinement block")]

CLASSES = ["cat", "dog"]


def _peaked_backbone(family: str) -> difffeat.Backbone:
    """A tiny pipeline of ``family`` (difffeat.testing) with every UNet query scaled by 16, so its attention maps are
    peaked like a trained model's and its decisions are not ties that float rounding flips (a random tiny
    model's maps are near uniform: min-max of their class scores magnifies rounding ~1e5 times)."""
    from difffeat.testing import tiny_pipeline

    pipe = tiny_pipeline(family)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.to_q.weight.mul_(16)
    return difffeat.load(pipe)


@pytest.fixture(scope="module")
def peaked():
    cache: dict[str, difffeat.Backbone] = {}

    def get(family: str) -> difffeat.Backbone:
        if family not in cache:
            cache[family] = _peaked_backbone(family)
        return cache[family]

    return get


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _direct_scores(seg: difffeat.Segmenter, whole) -> torch.Tensor:
    """``<P, U(S_m)>`` per layer in float64 from the whole maps of an ``everything`` observation: P from the
    reference feature, U(S_m) built by resize_self_map (not the adjoint form either path uses)."""
    s = seg.settings
    acts = whole.activations
    ref = acts[seg.ref_name].double()
    size = max((grid_of(acts[n].shape[1], whole.grid) for n in seg.cross_names), key=lambda g: g[0] * g[1])
    if s.pseudo_grid == "map" and tuple(ref.shape[-2:]) != size:
        ref = F.interpolate(ref, size=size, mode="bilinear", align_corners=False)
    if s.ref_channels == "first":
        ref = ref[:, :1]
    f = ref.flatten(2).transpose(1, 2)  # [B, HW, C]
    p = torch.softmax(f @ f.transpose(1, 2) / f.shape[-1] ** 0.5, dim=-1)
    target = tuple(ref.shape[-2:])
    scores = []
    for name in seg.self_names:
        m = acts[name].double()
        u = resize_self_map(m, grid_of(m.shape[1], whole.grid), target, s.self_map_resize == "mass-preserving")
        scores.append((p * u).sum(dim=(1, 2)))
    return torch.stack(scores, dim=1)


# SD1.5's tiny geometry: 32x32 and 16x16 blocks, the auto reference at 32x32 (coarser maps: U^T P); a 16x16
# reference (finer maps: rows of U(S)); the map grid for P; refinement maps on two grids (one resized to the
# largest). SDXL's: the reference after most blocks, or after all of them.
CASES = {
    "sd15": ("sd", {}),
    "sd15-coarse-ref-all-channels-mass": ("sd", dict(ref_block="up_blocks.0.attentions.1.transformer_blocks.0",
                                                     ref_channels="all", self_map_resize="mass-preserving")),
    "sd15-pseudo-grid-map": ("sd", dict(ref_block="up_blocks.0.attentions.1.transformer_blocks.0", pseudo_grid="map")),
    "sdxl": ("sdxl", {}),
    "sd15-refine-on-two-grids": ("sd", dict(refine_blocks=["down_blocks.0.attentions.1.transformer_blocks.0",
                                                           "down_blocks.1.attentions.0.transformer_blocks.0"])),
    "sdxl-last-ref": ("sdxl", dict(ref_block="up_blocks.0.attentions.2.transformer_blocks.1")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_passes_give_the_one_pass_maps_scores_and_labels(peaked, case):
    family, settings = CASES[case]
    backbone = peaked(family)
    one = difffeat.Segmenter(backbone, memory="one-pass", **settings)
    two = difffeat.Segmenter(backbone, memory="two-pass", **settings)
    image = random_image(64, 64)
    a_obs, b_obs = one.observe(image, CLASSES), two.observe(image, CLASSES)
    assert a_obs.layer_scores is None and b_obs.layer_scores is not None
    for name in one.cross_names:  # the same kernels on the same data: bit-equal
        assert torch.equal(b_obs.activations[name], a_obs.activations[name]), name
    assert not set(b_obs.activations) & set(one.self_names)  # no self map kept
    direct = _direct_scores(one, one.observe(image, CLASSES, everything=True))
    torch.testing.assert_close(b_obs.layer_scores.double(), direct, rtol=2e-5, atol=1e-9)
    if one.settings.refine_order > 0:
        want = a_obs.refine_mean
        if want is None:  # one pass kept the refinement maps whole
            from difffeat.segment.selfmaps import mean_self_map

            size = max((grid_of(a_obs.activations[n].shape[1], a_obs.grid) for n in one.cross_names), key=lambda g: g[0] * g[1])
            want = mean_self_map(a_obs.activations, one.refine_names, a_obs.grid, size, one.settings.self_map_resize == "mass-preserving")
        torch.testing.assert_close(b_obs.refine_mean, want, rtol=1e-5, atol=1e-8)
    a, b = one.decide(a_obs), two.decide(b_obs)
    assert b.layer_weights == pytest.approx(a.layer_weights, rel=2e-5, abs=1e-8)
    torch.testing.assert_close(b.class_maps, a.class_maps, rtol=1e-3, atol=1e-4)
    full = torch.cat([a.background[None], a.class_maps]).float()
    full = F.interpolate(full[None], size=a.labels.shape, mode="bilinear", align_corners=False)[0]
    top2 = full.topk(2, dim=0).values
    margin = (top2[0] - top2[1]).numpy()
    differ = a.labels != b.labels
    assert (margin[differ] < 1e-4).all(), "a pixel with a clear decision differs"  # only float-rounding ties may flip
    assert differ.mean() < 0.005
    assert len(np.unique(a.labels)) == 3  # not trivially one label



@pytest.mark.parametrize("case", ["sd15-refine-on-two-grids", "sdxl"])
def test_two_passes_on_chunk_workers_equal_the_row_ordered_reducers(peaked, monkeypatch, two_threads, case):
    """The layer-score reducers run on both workers at once; the scores and the refinement sum equal those of
    the reducers called one chunk at a time in row order (as before they were marked thread-safe) bit for bit:
    the same single-threaded kernels on the same chunks, the score parts added in row order. The labels are
    the one-pass labels."""
    from difffeat.segment.layerscores import LayerScoreStream

    family, settings = CASES[case]
    backbone = peaked(family)
    image = random_image(64, 64)
    seg = difffeat.Segmenter(backbone, memory="two-pass", **settings)
    threads: set[str] = set()
    score = LayerScoreStream._score

    def noting(self, name, mean, rows):
        threads.add(threading.current_thread().name)
        score(self, name, mean, rows)

    monkeypatch.setattr(LayerScoreStream, "_score", noting)
    got = seg.observe(image, CLASSES)
    assert threads and all(t.startswith("difffeat-chunk") for t in threads)  # reduced on the chunk workers
    reducer = LayerScoreStream._reducer

    def serialized(self, name):
        r = reducer(self, name)
        return lambda probs, **kw: r(probs, **kw)  # a plain function: called one chunk at a time, in row order

    monkeypatch.setattr(LayerScoreStream, "_reducer", serialized)
    want = seg.observe(image, CLASSES)
    assert torch.equal(got.layer_scores, want.layer_scores)
    assert torch.equal(got.refine_mean, want.refine_mean)
    one = difffeat.Segmenter(backbone, memory="one-pass", **settings)
    a, b = one(image, CLASSES), seg.decide(got)
    full = torch.cat([a.background[None], a.class_maps]).float()
    full = F.interpolate(full[None], size=a.labels.shape, mode="bilinear", align_corners=False)[0]
    top2 = full.topk(2, dim=0).values
    margin = (top2[0] - top2[1]).numpy()
    differ = a.labels != b.labels
    assert (margin[differ] < 1e-4).all(), "a pixel with a clear decision differs"  # as in the test above
    assert differ.mean() < 0.005


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_two_passes_score_the_layers_of_dit_families_too(tiny_pipes, family):
    """Every block on one grid; the reference a query early in the stack."""
    from _helpers import backbone_for

    backbone = backbone_for(tiny_pipes, family)
    one, two = (difffeat.Segmenter(backbone, memory=m) for m in ("one-pass", "two-pass"))
    image = random_image(64, 64)
    a, b = one.observe(image, CLASSES), two.observe(image, CLASSES)
    for name in one.cross_names:
        assert torch.equal(b.activations[name], a.activations[name]), name
    direct = _direct_scores(one, one.observe(image, CLASSES, everything=True))
    torch.testing.assert_close(b.layer_scores.double(), direct, rtol=2e-5, atol=1e-9)
    assert two.decide(b).layer_weights == pytest.approx(one.decide(a).layer_weights, rel=2e-5, abs=1e-8)


def test_two_passes_in_a_batch_equal_each_image_alone(peaked):
    seg = difffeat.Segmenter(peaked("sdxl"), memory="two-pass")
    images = [random_image(64, 64, seed=i) for i in range(2)]
    batch = seg.observe_batch(images, [CLASSES, ["cat", "tree"]])
    for image, classes, got in zip(images, [CLASSES, ["cat", "tree"]], batch):
        alone = seg.observe(image, classes)
        # a batched forward rounds differently from a single one (~1e-6 on map values ~1/256)
        torch.testing.assert_close(got.layer_scores, alone.layer_scores, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got.refine_mean, alone.refine_mean, rtol=1e-4, atol=1e-6)


def test_the_early_exit_of_the_first_pass_leaves_no_hook(peaked):
    backbone = peaked("sdxl")
    seg = difffeat.Segmenter(backbone, memory="two-pass")
    unet = backbone.denoiser
    hooks = _hooks(unet)
    processors = {n: type(p) for n, p in unet.attn_processors.items()}
    _, inputs = seg.prepare(random_image(64, 64), CLASSES)
    ran: list[str] = []
    probe = unet.up_blocks[-1].register_forward_hook(lambda *_: ran.append("last"))
    try:
        seg.observe_prepared([random_image(64, 64)], [seg.prepare(random_image(64, 64), CLASSES)[0]], inputs)
    finally:
        probe.remove()
    assert not ran  # both passes stopped early (SDXL's last up level has no attention)
    assert _hooks(unet) == hooks
    assert {n: type(p) for n, p in unet.attn_processors.items()} == processors
    bare = backbone.denoise(inputs)[0]  # the denoiser runs unobserved afterwards
    assert bare.shape[-2:] == inputs.kwargs["sample"].shape[-2:]


def test_a_failing_second_pass_leaves_no_hook(peaked, monkeypatch):
    backbone = peaked("sd")
    seg = difffeat.Segmenter(backbone, memory="two-pass")
    hooks = _hooks(backbone.denoiser)

    def broken(self, name, mean, rows):
        raise RuntimeError("scoring failed")

    from difffeat.segment.layerscores import LayerScoreStream

    monkeypatch.setattr(LayerScoreStream, "_score", broken)
    with pytest.raises(RuntimeError, match="scoring failed"):
        seg(random_image(64, 64), CLASSES)
    assert _hooks(backbone.denoiser) == hooks


def test_a_two_pass_observation_decides_only_under_its_own_settings(peaked):
    backbone = peaked("sd")
    obs = difffeat.Segmenter(backbone, memory="two-pass").observe(random_image(64, 64), CLASSES)
    with pytest.raises(ConfigError, match="ref_channels"):
        difffeat.Segmenter(backbone, ref_channels="all").decide(obs)
    difffeat.Segmenter(backbone, tau=0.2).decide(obs)  # other decision settings are fine


# --------------------------------------------------------------------------- the accounting and the choice
@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("passes", ["one-pass", "two-pass"])
def test_the_accounting_is_what_each_observation_keeps(peaked, monkeypatch, family, passes):
    from difffeat.segment.layerscores import LayerScoreStream

    streams = []
    init = LayerScoreStream.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(LayerScoreStream, "__init__", remember)
    seg = difffeat.Segmenter(peaked(family), memory=passes, self_map_resize="mass-preserving",
                             ref_block="up_blocks.0.attentions.1.transformer_blocks.0")
    layout, inputs = seg.prepare(random_image(64, 64), CLASSES)
    obs = seg.observe_prepared([random_image(64, 64)], [layout], inputs)[0]
    kept = sum(x.numel() * x.element_size() for x in obs.activations.values())
    if passes == "one-pass":  # cross maps, reduced self maps, reference feature, refinement mean
        assert not streams
        kept += 0 if obs.refine_mean is None else obs.refine_mean.numel() * 4
    else:  # cross maps + what the stream held (reference tokens, U^T P, the refinement sum = obs.refine_mean)
        (stream,) = streams
        assert stream.refine_sum.data_ptr() == obs.refine_mean.data_ptr()
        kept += stream.kept_bytes()
    assert kept / 2**20 == pytest.approx(maps_kept_mb(seg.map_geometry(inputs), passes, "reference", True), abs=1e-9)


def test_goca_memory_benchmark_measures_what_it_accounts():
    from difffeat.devtools.bench import goca_memory_child

    one, two = (goca_memory_child(passes, 128, 1) for passes in ("one-pass", "two-pass"))
    assert one["kept_maps_mb"] == pytest.approx(one["accounted_kept_maps_mb"], rel=1e-6)
    # two passes: the observation holds the cross maps and the refinement mean; the accounting adds what the
    # stream held during the forward (the reference tokens, U^T P at the coarser grid)
    assert two["kept_maps_mb"] <= two["accounted_kept_maps_mb"] < one["kept_maps_mb"]
    assert one["observe_s"] > 0 and two["observe_s"] > 0


def test_map_geometry_scales_with_the_input():
    seg = difffeat.Segmenter("shapes")
    _, small = seg.prepare(random_image(64, 64), ["circle"])
    big = difffeat.Segmenter(seg.backbone, resolution=4 * small.image_size[0])
    _, large = big.prepare(random_image(64, 64), ["circle"])
    a, b = seg.map_geometry(small), big.map_geometry(large)
    for name in a.cross:
        assert b.cross[name] == (a.cross[name][0] * 4, a.cross[name][1] * 4)
    assert b.reference == (a.reference[0] * 4, a.reference[1] * 4)


def _geometry(side: int) -> MapGeometry:
    """SDXL-like: 4 blocks at 2 side x 2 side before the reference, 6 after, 60 at side x side."""
    big, small = (2 * side, 2 * side), (side, side)
    names = [f"b{i}" for i in range(70)]
    grids = dict(zip(names, [big] * 4 + [small] * 60 + [big] * 6))
    return MapGeometry(cross=grids, weight=grids, refine={n: big for n in names[:2]}, reference=big, ref_channels=640)


def test_two_passes_keep_one_refinement_sum_where_one_pass_keeps_every_map():
    geo = _geometry(64)  # SDXL at 2048 px
    one, two = (maps_kept_mb(geo, p) for p in ("one-pass", "two-pass"))
    per_map = (128 * 128) ** 2 * 4 / 2**20
    assert one > 10 * per_map  # every 128x128 self map (and the 64x64 ones)
    assert two < 1.2 * per_map  # one refinement sum, U^T P at 64x64, cross maps


@pytest.mark.parametrize("side, batch, budget, want", [
    (64, 1, 2048, "two-pass"),  # 13.9 GiB in one pass
    (4, 1, 2048, "one-pass"),  # tiny: within the budget
    (4, 1, 0.0, "two-pass"),  # any map over a zero budget
    (16, 64, 2048, "two-pass"),  # a batch's maps count together
])
def test_auto_takes_two_passes_only_over_the_budget(side, batch, budget, want):
    assert choose_passes("auto", _geometry(side), batch, budget, "reference", True) == want
    assert choose_passes("one-pass", _geometry(side), batch, budget, "reference", True) == "one-pass"


def test_auto_keeps_one_pass_when_two_would_not_save():
    grids = {"a": (8, 8)}
    geo = MapGeometry(cross=grids, weight=grids, refine=grids, reference=(8, 8), ref_channels=1)  # one block
    assert maps_kept_mb(geo, "two-pass") >= maps_kept_mb(geo, "one-pass")
    assert choose_passes("auto", geo, 1, 0.0, "reference", True) == "one-pass"


def test_segmenter_auto_choice_follows_the_budget(peaked):
    backbone = peaked("sdxl")
    _, inputs = difffeat.Segmenter(backbone).prepare(random_image(64, 64), CLASSES)
    assert difffeat.Segmenter(backbone).passes(inputs) == "one-pass"  # a few MiB of maps
    assert difffeat.Segmenter(backbone, map_budget_mb=0.5).passes(inputs) == "two-pass"
    assert difffeat.Segmenter(backbone, map_budget_mb=0.5).passes(inputs, everything=True) == "one-pass"
    assert difffeat.Segmenter(backbone, map_budget_mb=0.5, layers="uniform").passes(inputs) == "one-pass"
    obs = difffeat.Segmenter(backbone, map_budget_mb=0.5).observe(random_image(64, 64), CLASSES)
    assert obs.layer_scores is not None


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "2G"])
def test_map_budget_is_range_checked(bad):
    with pytest.raises(InvalidOptionError, match="map_budget_mb"):
        difffeat.SegmentSettings(map_budget_mb=bad)
    with pytest.raises(ConfigError, match="memory="):
        difffeat.SegmentSettings(memory="bounded")


# --------------------------------------------------------------------------- the streamed pieces
def test_target_rows_of_every_chunk_make_the_resized_map():
    g = torch.Generator().manual_seed(0)
    for grid, target in [((8, 6), (4, 3)), ((4, 3), (8, 6)), ((5, 7), (3, 4)), ((4, 4), (4, 4))]:
        s = torch.softmax(torch.randn(2, grid[0] * grid[1], grid[0] * grid[1], generator=g), dim=-1)
        want = resize_self_map(s, grid, target, True)
        got = torch.full_like(want, float("nan"))
        rows = TargetRows(grid, target)
        for start in range(0, s.shape[1], 5):
            chunk = slice(start, min(s.shape[1], start + 5))
            t, u = rows.rows(s[:, chunk], chunk, True)
            got[:, t] = u
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_key_resize_adjoint_is_the_adjoint():
    g = torch.Generator().manual_seed(1)
    grid, target = (4, 6), (8, 12)
    s = torch.rand(1, 5, 24, generator=g, dtype=torch.float64)
    p = torch.rand(1, 5, 96, generator=g, dtype=torch.float64)
    lhs = (p * resize_keys(s, grid, target, True)).sum()
    rhs = (resize_keys_adjoint(p, grid, target, True).double() * s).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=0)
    full = torch.rand(1, 96, 96, generator=g)
    rows = TargetRows(grid, target)
    built = torch.zeros(1, 24, 24).index_add_(1, rows.source, resize_keys_adjoint(full, grid, target, False))
    torch.testing.assert_close(built, resize_self_map_adjoint(full, grid, target, False), rtol=1e-5, atol=1e-7)


def test_the_memory_mode_is_not_part_of_a_run_manifest(tmp_path):
    """Labels do not depend on it: a run folder made in one pass resumes in two without a settings mismatch."""
    from difffeat.runs import commands

    random_image(64, 64).save(tmp_path / "a.png")
    settings = difffeat.SegmentSettings(memory="two-pass", map_budget_mb=1.0)
    assert "memory" in settings.to_dict() and "memory" not in settings.to_dict(results_only=True)
    summary, _ = commands.segment([str(tmp_path / "a.png")], "circle", out_dir=tmp_path / "o", memory="one-pass", num_workers=0)
    assert summary.written == 1
    summary, _ = commands.segment([str(tmp_path / "a.png")], "circle", out_dir=tmp_path / "o", memory="two-pass", num_workers=0)
    assert summary.written == 0 and summary.skipped == 1
