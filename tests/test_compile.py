"""A compiled denoiser (torch.compile) gives the same captured activations, maps and segmentation as the eager
one, with the same activation names (hooks go on the original module), early exit included."""

from __future__ import annotations

import pytest
import torch

import difffeat
from difffeat import Capture, Segmenter
from difffeat.testing import tiny_pipeline

from _helpers import assert_labels_differ_only_at_ties, random_image


@pytest.mark.slow  # dynamo tracing of the tiny FLUX model takes ~20 s on a loaded 2-core machine
def test_capture_and_segmentation_on_a_compiled_denoiser_equal_the_eager_ones():
    eager = difffeat.load(tiny_pipeline("flux"), device="cpu", dtype="fp32")
    pipe = tiny_pipeline("flux")
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")  # an OptimizedModule in the pipeline
    compiled = difffeat.load(pipe, device="cpu", dtype="fp32")
    for b in (eager, compiled):
        b.max_sequence_length = 32
    assert difffeat.list_activations(compiled).names() == difffeat.list_activations(eager).names()
    names = [a.name for a in difffeat.list_activations(eager) if a.kind in ("cross-map", "self-map", "block-out", "joint-q")]
    inputs = eager.prepare([random_image(64, 48)], "a photo of a cat", t=100)
    with Capture(eager, names, inputs, early_exit=False) as ref:
        eager.denoise(inputs)
    with Capture(compiled, names, inputs, early_exit=False) as got:
        compiled.denoise(inputs)
    assert got.activations.keys() == ref.activations.keys()
    for name in names:
        torch.testing.assert_close(got.activations[name], ref.activations[name], atol=1e-5, rtol=1e-5, msg=name)
    with Capture(compiled, names[:1], inputs, early_exit=True) as first:
        compiled.denoise(inputs)
    torch.testing.assert_close(first.activations[names[0]], ref.activations[names[0]], atol=1e-5, rtol=1e-5)
    image = random_image(64, 64, seed=3)
    want = Segmenter(eager)(image, ["cat", "dog"])
    have = Segmenter(compiled)(image, ["cat", "dog"])
    # dynamo may pick other kernels for the same ops: the scores agree to float noise, and the labels of this
    # random model's flat maps may differ only where its decision is a tie within that noise
    torch.testing.assert_close(have.class_maps, want.class_maps, rtol=0, atol=2e-2)
    assert_labels_differ_only_at_ties(want, have, noise=2e-2)
