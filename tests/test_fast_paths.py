"""Speed-ups never change results: each fast path is pinned against the computation it replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import difffeat
from difffeat import Capture
from difffeat.capture import head_mean
from difffeat.segment.aggregation import GocaHeadReducer

from _helpers import assert_labels_differ_only_at_ties, backbone_for, decision_margin, random_image

#: float results of different kernel paths compared within derived tolerances (`.ci/run` reruns these under a
#: second kernel set and one thread: `pytest -m numeric`)
pytestmark = pytest.mark.numeric

#: the chunk size before the allocator fix (exactly at glibc's mmap threshold)
OLD_CHUNK_ELEMENTS = 2**23


def _goca_maps(seg: difffeat.Segmenter, image, chunk_elements: int) -> dict[str, torch.Tensor]:
    """Every map one GOCA observation captures, computed with ``chunk_elements`` per chunk."""
    inputs = seg.backbone.prepare([image], "a photo of a cat and a dog, background", seg.settings.t, 0, 64)
    reducers = dict.fromkeys(seg.cross_names, GocaHeadReducer(seg._output_weights()))
    with Capture(seg.backbone, seg.activation_names(everything=True), inputs, map_reducer=head_mean,
                 map_reducers=reducers, chunk_elements=chunk_elements) as cap:
        seg.backbone.denoise(inputs)
    return cap.activations


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_chunk_size_leaves_every_map_unchanged(tiny_pipes, family):
    from difffeat.capture.observer import DEFAULT_CHUNK_ELEMENTS

    seg = difffeat.Segmenter(backbone_for(tiny_pipes, family), resolution=64)
    image = random_image(64, 64, seed=3)
    old = _goca_maps(seg, image, OLD_CHUNK_ELEMENTS)
    for chunk in (DEFAULT_CHUNK_ELEMENTS, 997):  # 997: many uneven chunks of a few rows
        new = _goca_maps(seg, image, chunk)
        assert new.keys() == old.keys()
        for name in old:
            torch.testing.assert_close(new[name], old[name], rtol=1e-5, atol=1e-6, msg=name)
    if family == "sd":  # 4 heads, a 32x32 self map: one chunk at the old size, several at the new one
        keys = 32 * 32
        assert DEFAULT_CHUNK_ELEMENTS // (4 * keys) < keys <= OLD_CHUNK_ELEMENTS // (4 * keys)

def test_bad_chunk_size_is_rejected(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    with pytest.raises(ValueError, match="chunk_elements must be >= 1"):
        Capture(backbone, [difffeat.list_activations(backbone).names()[0]], grid=(8, 8), chunk_elements=0)


def _explicit_layer_weights(ref, selfs, grids, first_channel, mass):
    """GOCA's layer weights the direct way: every self map resized to the reference grid, then <P, U(S)>."""
    from difffeat.segment.selfmaps import resize_self_map

    ref = ref[:, :1] if first_channel else ref
    b, c, h, w = ref.shape
    f = ref.flatten(2).transpose(1, 2)
    p = torch.softmax(f @ f.transpose(1, 2) / c**0.5, dim=-1)
    scores = torch.stack([(p * resize_self_map(s, g, (h, w), mass)).sum(dim=(1, 2)) for s, g in zip(selfs, grids)], 1)
    scores = scores.clamp_min(0)
    return scores / scores.sum(1, keepdim=True)


def _row_stochastic(b, n, gen):
    return torch.rand(b, n, n, generator=gen).softmax(-1)


@pytest.mark.parametrize("ref_grid", [(8, 8), (6, 10), (16, 16)])
@pytest.mark.parametrize("first_channel, mass", [(True, False), (False, True), (False, False)])
def test_adjoint_layer_weights_equal_the_explicit_resize(ref_grid, first_channel, mass):
    from difffeat.segment.aggregation import layer_weights

    gen = torch.Generator().manual_seed(0)
    grids = [(16, 16), (8, 8), (4, 4), (8, 8), (3, 5), (6, 10), (12, 20)]
    selfs = [_row_stochastic(2, gh * gw, gen) for gh, gw in grids]
    ref = torch.randn(2, 7, *ref_grid, generator=gen)
    got = layer_weights(ref, selfs, grids, first_channel, mass)
    want = _explicit_layer_weights(ref, selfs, grids, first_channel, mass)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_adjoint_is_the_transpose_of_the_resize():
    from difffeat.segment.selfmaps import resize_self_map, resize_self_map_adjoint

    gen = torch.Generator().manual_seed(1)
    for grid, target in [((4, 6), (8, 12)), ((8, 8), (5, 3)), ((7, 7), (7, 7))]:
        s = torch.randn(1, grid[0] * grid[1], grid[0] * grid[1], generator=gen)
        p = torch.randn(1, target[0] * target[1], target[0] * target[1], generator=gen)
        lhs = (p * resize_self_map(s, grid, target, True)).sum()
        rhs = (resize_self_map_adjoint(p, grid, target, True) * s).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def _resize_all_rows_then_nearest(s_bqk, grid, target, mass):
    """``U(S)`` as first written (our transcription of the published order): every query row's keys resized
    bilinearly, then the queries resized nearest as a spatial map."""
    b = s_bqk.shape[0]
    (h, w), (th, tw) = grid, target
    keys = F.interpolate(s_bqk.reshape(b * h * w, 1, h, w), size=(th, tw), mode="bilinear", align_corners=False)
    if mass:
        keys = keys * (h * w) / (th * tw)
    keys = keys.reshape(b, h, w, th * tw).permute(0, 3, 1, 2)
    queries = F.interpolate(keys, size=(th, tw), mode="nearest")
    return queries.reshape(b, th * tw, th * tw).transpose(1, 2)


@pytest.mark.parametrize("grid, target", [((8, 8), (4, 4)), ((16, 16), (8, 8)), ((6, 10), (3, 5)), ((4, 6), (8, 12)),
                                          ((3, 5), (6, 10)), ((8, 8), (5, 3))])
@pytest.mark.parametrize("mass", [True, False])
def test_self_map_resize_is_unchanged_by_picking_rows_first(grid, target, mass):
    """The one ``resize_self_map`` (rows picked by ``nearest_rows``, then ``resize_keys``) gives the values of the
    order it was first written in (the same per-row kernels on the same rows; to float rounding)."""
    from difffeat.segment.selfmaps import resize_self_map

    s = _row_stochastic(2, grid[0] * grid[1], torch.Generator().manual_seed(3))
    got = resize_self_map(s, grid, target, mass)
    torch.testing.assert_close(got, _resize_all_rows_then_nearest(s, grid, target, mass), rtol=1e-6, atol=1e-9)


def test_accumulated_refinement_mean_equals_the_stacked_mean():
    from difffeat.segment.selfmaps import mean_self_map, resize_self_map

    gen = torch.Generator().manual_seed(2)
    acts = {"a": _row_stochastic(1, 64, gen), "b": _row_stochastic(1, 64, gen), "c": _row_stochastic(1, 16, gen)}
    for mass in (True, False):
        want = torch.stack([resize_self_map(acts[n], (int(acts[n].shape[1] ** 0.5),) * 2, (8, 8), mass) for n in acts]).mean(0)
        torch.testing.assert_close(mean_self_map(acts, list(acts), (8, 8), (8, 8), mass), want)
    before = acts["a"].clone()
    mean_self_map(acts, ["a", "b"], (8, 8), (8, 8), True)
    assert torch.equal(acts["a"], before)  # the captured map is not modified in place


class _CountingEncode:
    """Wraps a VAE's ``encode`` and counts the images it encodes (calls x batch)."""

    def __init__(self, vae):
        self.vae, self.stock, self.images, self.calls = vae, vae.encode, 0, 0

    def __enter__(self):
        def encode(x, *a, **k):
            self.images += x.shape[0]
            self.calls += 1
            return self.stock(x, *a, **k)

        self.vae.encode = encode
        return self

    def __exit__(self, *exc):
        del self.vae.encode  # back to the class's method


def test_map_prompt_extraction_encodes_each_image_once(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    cat = difffeat.list_activations(backbone)
    names = [next(a.name for a in cat if a.kind == "block-out"), next(a.name for a in cat if a.is_map)]
    images = [random_image(64, 64, seed=s) for s in (1, 2)]
    fx = difffeat.FeatureExtractor(backbone, names, resolution=64, map_prompt="a photo of a cat")
    with _CountingEncode(backbone.pipeline.vae) as count:
        got = fx.extract_batch(images, ["a dog", "a cat"])
    assert count.images == 2 and count.calls == 1  # was 4 images in 2 calls (one per pass)
    # the same features as passes that each encode
    plain_fx = difffeat.FeatureExtractor(backbone, names[:1], resolution=64)
    torch.testing.assert_close(got[names[0]], plain_fx.extract_batch(images, ["a dog", "a cat"])[names[0]])
    assert backbone.latent_cache is None  # the call-scoped cache is gone


def test_several_observations_of_one_image_encode_it_once(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    segs = [difffeat.Segmenter(backbone, method=m, resolution=64) for m in ("goca", "vanilla")]
    image = random_image(64, 64, seed=4)
    separate = [s.observe(image, ["cat", "dog"]).activations for s in segs]
    with _CountingEncode(backbone.pipeline.vae) as count, backbone.reusing_latents() as cache:
        shared = [s.observe(image, ["cat", "dog"]).activations for s in segs]
    assert count.images == 1 and (cache.hits, cache.misses) == (1, 1)
    for a, b in zip(shared, separate):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_persistent_latent_cache_skips_the_vae_on_repeated_runs(tiny_pipes):
    from difffeat.backbones.latents import LatentCache

    backbone = backbone_for(tiny_pipes, "sd")
    cache = LatentCache(max_items=2)
    images = [random_image(64, 64, seed=s) for s in (5, 6, 7)]
    with _CountingEncode(backbone.pipeline.vae) as count:
        for _ in range(2):
            with backbone.reusing_latents(cache):
                backbone.prepare(images[:2], "a cat", t=100)
        assert count.images == 2  # the second run encoded nothing
        with backbone.reusing_latents(cache):
            backbone.prepare([images[2], images[2]], "a cat", t=100)  # a duplicate in one batch: one encode
        assert count.images == 3 and len(cache) == 2  # least recently used dropped
    with pytest.raises(ValueError, match="max_items"):
        LatentCache(max_items=0)


def test_batched_segmentation_equals_single_runs(shapes_backbone):
    """On the shapes model, whose maps are peaked (a random tiny model's are nearly flat, so min-max scaling
    turns float noise into label flips): batched class maps equal single runs' to float tolerance, and labels
    differ only where the single run's decision is a tie within that tolerance."""
    from difffeat.shapes import world

    seg = difffeat.Segmenter(shapes_backbone)
    samples = [world.sample("test", i) for i in (1, 3, 4, 6)]
    images = [s.image for s in samples]
    images[1] = images[1].resize((96, 48))  # another size: its own forward
    classes = [list(s.classes_present) for s in samples]
    classes[2] = classes[2] + ["heart"]  # class lists (and captions) of different lengths
    single = list(seg.segment(images, classes, batch_size=1))
    calls = []
    stock = seg.observe_batch
    seg.observe_batch = lambda ims, *a, **k: calls.append(len(ims)) or stock(ims, *a, **k)
    try:
        batched = list(seg.segment(images, classes, batch_size=4))
    finally:
        del seg.observe_batch
    assert sorted(calls) == [1, 3]  # the 96x48 image gets its own forward; the three 64x64 share one
    for one, many in zip(single, batched):
        assert one.classes == many.classes and one.caption == many.caption and one.labels.shape == many.labels.shape
        torch.testing.assert_close(torch.tensor(many.layer_weights), torch.tensor(one.layer_weights), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(many.class_maps, one.class_maps, rtol=0, atol=1e-3)
        torch.testing.assert_close(many.background, one.background, rtol=0, atol=1e-3)
        assert_labels_differ_only_at_ties(one, many)
        assert (decision_margin(one) > 1e-2).mean() > 0.9  # peaked maps: the check above is not vacuous
    # what the batched forward captures equals each image's own forward to float tolerance
    same = [0, 2, 3]
    for i, obs in zip(same, seg.observe_batch([images[i] for i in same], [classes[i] for i in same])):
        own = seg.observe(images[i], classes[i])
        assert obs.layout.caption == own.layout.caption
        for name, value in own.activations.items():
            torch.testing.assert_close(obs.activations[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_batch_size_is_rejected(tiny_pipes, bad):
    from difffeat.errors import InvalidOptionError

    seg = difffeat.Segmenter(backbone_for(tiny_pipes, "sd"), resolution=64)
    with pytest.raises(InvalidOptionError, match="batch_size"):
        list(seg.segment([random_image(64, 64)], ["cat"], batch_size=bad))


def test_reduced_precision_vae_encode_is_close_and_never_reuses_fp32_latents(tiny_pipes):
    import copy

    backbone = backbone_for(tiny_pipes, "sd")
    stock_vae = backbone.pipeline.vae
    backbone.pipeline.vae = copy.deepcopy(stock_vae)  # the fixture's pipelines are shared
    try:
        images = [random_image(64, 64, seed=s) for s in (12, 13)]
        with backbone.reusing_latents() as cache:
            fp32 = backbone.prepare(images, "a cat", t=100).latents
            backbone.set_vae_dtype(torch.bfloat16)
            assert backbone.pipeline.vae.dtype == torch.bfloat16
            with _CountingEncode(backbone.pipeline.vae) as count:
                low = backbone.prepare(images, "a cat", t=100).latents
            assert count.images == 2 and len(cache) == 4  # the bf16 VAE encodes again: the cache keys by dtype
        assert low.dtype == fp32.dtype == backbone.dtype  # latents go back to the denoiser's dtype
        rel = float((low - fp32).norm() / fp32.norm())
        assert 0 < rel < 0.05, rel  # bf16 changes the latents, a little (independent fp32 encode as reference)
    finally:
        backbone.pipeline.vae = stock_vae
