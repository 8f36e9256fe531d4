"""The fast observation paths change no result: the fused attention output equals the unobserved forward's,
and self maps reduced during the forward equal the whole maps resized afterwards (and decide the same)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import difffeat
from difffeat import Capture
from difffeat.segment.selfmaps import grid_of, resize_self_map
from difffeat.errors import ConfigError

from _helpers import backbone_for, random_image

#: float results of different kernel paths compared within derived tolerances (`.ci/run` reruns these under a
#: second kernel set and one thread: `pytest -m numeric`)
pytestmark = pytest.mark.numeric


class _KernelCount(TorchDispatchMode):
    """Counts the attention kernels that really run (below the function-level modes the observer uses)."""

    def __init__(self):
        super().__init__()
        self.sdpa = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.sdpa += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_fused_output_equals_the_unobserved_forward(tiny_pipes, family):
    backbone = backbone_for(tiny_pipes, family)
    inputs = backbone.prepare([random_image(64, 64)], "a photo of a cat", t=100, seed=0)
    maps = [a.name for a in difffeat.list_activations(backbone) if a.is_map]
    with _KernelCount() as bare_count:
        bare = backbone.denoise(inputs)[0]
    with Capture(backbone, maps, inputs, early_exit=False) as plain:
        backbone.denoise(inputs)
    with _KernelCount() as fused_count, Capture(backbone, maps, inputs, early_exit=False, fuse_output=True) as fused:
        out = backbone.denoise(inputs)[0]
    torch.testing.assert_close(out, bare, rtol=1e-4, atol=1e-5)
    for name in maps:
        torch.testing.assert_close(fused.activations[name], plain.activations[name], rtol=1e-4, atol=1e-6, msg=name)
    if family in ("sd", "sdxl"):  # every observed UNet attention is fused: SDPA runs once per unobserved call only
        assert fused_count.sdpa < bare_count.sdpa
    else:  # joint attention (text query rows the observer does not compute): SDPA runs as usual
        assert fused_count.sdpa == bare_count.sdpa


def test_fused_output_is_not_used_with_gradients(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    inputs = backbone.prepare([random_image(64, 64)], "a cat", t=100, seed=0)
    name = next(a.name for a in difffeat.list_activations(backbone) if a.is_map)
    unet = backbone.denoiser
    with _KernelCount() as bare:
        backbone.denoise(inputs)
    with _KernelCount() as count, Capture(backbone, [name], inputs, early_exit=False, fuse_output=True):
        with torch.enable_grad():
            unet(**inputs.kwargs, return_dict=False)
    assert count.sdpa == bare.sdpa  # the observed call's SDPA ran: autograd needs its own kernel


def _scene():
    from difffeat.shapes import world

    return world.sample("test", 1).image


def _segmenter(**overrides):
    # the embedded shapes model with its reference at 8x8, so the 16x16 blocks' self maps are reduced; one
    # refinement block (up_blocks.2.attentions.1) is not a combined layer, so it keeps nothing of its own
    seg = difffeat.Segmenter("shapes")
    layers = tuple(b for b in seg.blocks if not b.startswith("up_blocks.2.attentions.1"))
    refine = tuple(f"{b}.transformer_blocks.0" for b in ("down_blocks.0.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"))
    return difffeat.Segmenter(seg.backbone, ref_block="up_blocks.1.attentions.0.transformer_blocks.0", map_layers=layers,
                              refine_blocks=refine, **overrides)


@pytest.mark.parametrize("resize", ["plain", "mass-preserving"])
def test_self_maps_reduced_during_the_forward_equal_the_whole_maps_resized(tiny_pipes, resize):
    seg = _segmenter(self_map_resize=resize)
    image, classes = _scene(), ["circle", "square", "triangle"]
    whole = seg.observe(image, classes, everything=True)  # the whole head-mean maps
    fast = seg.observe(image, classes)
    assert whole.reduced is None and fast.reduced is not None and fast.refine_mean is not None
    grid = fast.grid
    ref_grid = tuple(fast.activations[seg.ref_name].shape[-2:])
    reduced = 0
    for name in seg.self_names:
        full = whole.activations[name]
        g = grid_of(full.shape[1], grid)
        if g[0] > ref_grid[0]:
            want = resize_self_map(full, g, ref_grid, resize == "mass-preserving")
            reduced += 1
        else:
            want = full
        torch.testing.assert_close(fast.activations[name], want, rtol=1e-5, atol=1e-7, msg=name)
    assert reduced == 2  # down_blocks.0.attentions.0 and up_blocks.2.attentions.0 (16x16 over the 8x8 reference)
    refine_only = "up_blocks.2.attentions.1.transformer_blocks.0.attn1.map"
    assert refine_only not in fast.activations and refine_only in whole.activations
    mean = torch.stack([whole.activations[n] for n in seg.refine_names]).mean(dim=0)  # independent of mean_self_map
    torch.testing.assert_close(fast.refine_mean, mean, rtol=1e-5, atol=1e-7)
    kept = lambda obs: sum(x.numel() for x in obs.activations.values())  # noqa: E731
    assert kept(fast) + fast.refine_mean.numel() < kept(whole)
    a, b = seg.decide(whole), seg.decide(fast)
    assert (a.labels == b.labels).all()
    torch.testing.assert_close(b.class_maps, a.class_maps, rtol=1e-4, atol=1e-5)
    assert b.layer_weights == pytest.approx(a.layer_weights, rel=1e-4, abs=1e-6)


def test_reduced_observation_refuses_other_self_map_settings():
    seg = _segmenter()
    fast = seg.observe(_scene(), ["circle"])
    other = "plain" if seg.settings.self_map_resize == "mass-preserving" else "mass-preserving"
    with pytest.raises(ConfigError, match="everything=True"):
        _segmenter(self_map_resize=other).decide(fast)
    _segmenter(tau=0.3).decide(fast)  # other decision settings are fine


def test_reduced_maps_do_not_depend_on_the_chunk_size():
    from difffeat.capture import head_mean

    seg = _segmenter()
    _, inputs = seg.prepare(_scene(), ["circle"])
    results = []
    for chunk in (2**20, 5000):  # one chunk per map / a few query rows per chunk (rows split across targets)
        stream = seg._self_map_stream(tuple(inputs.grid))
        with Capture(seg.backbone, stream.names() + [seg.ref_name], inputs, map_reducer=head_mean,
                     map_reducers=stream.reducers(), chunk_elements=chunk) as cap:
            seg.backbone.denoise(inputs)
        acts = dict(cap.activations)
        results.append((acts, stream.finish(acts, tuple(acts[seg.ref_name].shape[-2:]))))
    (one, mean_one), (many, mean_many) = results
    assert one.keys() == many.keys() and stream.targets
    for name in one:
        torch.testing.assert_close(many[name], one[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(mean_many, mean_one, rtol=1e-5, atol=1e-7)
