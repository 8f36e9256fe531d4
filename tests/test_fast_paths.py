"""Speed-ups never change results: each fast path is pinned against the computation it replaced."""

from __future__ import annotations

import pytest
import torch

import difffeat
from difffeat import Capture
from difffeat.capture import head_mean
from difffeat.segment.aggregation import GocaHeadReducer

from _helpers import backbone_for, random_image

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
        Capture(backbone, [backbone.catalog().names()[0]], grid=(8, 8), chunk_elements=0)
