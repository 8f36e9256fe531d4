"""Z-Image pads every block of its sequences to a multiple of 32 tokens: [image, image padding, text, text
padding] (padding tokens are attended to), a batch's shorter items are then padded and masked. The image is
chosen so its grid (10 x 10 = 100 tokens) needs 28 padding tokens, and prompts so one needs a 32-token and one
a 64-token text block: the maps must hold the image queries and keys and the text keys, every prompt the same
width, and agree with a softmax recomputed here from the q/k the kernel got."""

from __future__ import annotations

import pytest
import torch

import difffeat
from difffeat import Capture
from difffeat.testing import tiny_pipeline

from _helpers import SDPARecorder, random_image

SHORT = "a cat"
LONG = "a photo of a small cat and a big dog sitting on the grass in the park near a red car at night in winter"
JOINT, REFINER = "layers.0.attention", "noise_refiner.0.attention"
N_IMG, IMG_BLOCK = 100, 128  # 40 x 40 px -> 20 x 20 latents -> 10 x 10 tokens, padded to 128


@pytest.fixture(scope="module")
def backbone():
    b = difffeat.load(tiny_pipeline("zimage"), device="cpu", dtype="fp32")
    b.max_sequence_length = 64  # text blocks of 32 or 64 tokens; maps 64 wide
    return b


def _text_block(backbone, prompt: str) -> int:
    seg = backbone.text_segments()[0]
    n = len(seg.tokenizer(seg.template.format(prompt))["input_ids"])
    return -(-n // 32) * 32


def _capture(backbone, prompts):
    inputs = backbone.prepare([random_image(40, 40, seed=i) for i in range(len(prompts))], prompts, t=300, resolution=40)
    names = [f"{JOINT}.map", f"{JOINT}.self_map", f"{REFINER}.map", "layers.1"]
    difffeat.list_activations(backbone)  # the catalog's probe forward runs before the recorder watches
    recorder = SDPARecorder(backbone.denoiser, [JOINT, REFINER])
    try:
        with Capture(backbone, names, inputs, early_exit=False) as cap:
            backbone.denoise(inputs)
    finally:
        recorder.remove()
    return inputs, cap.activations, recorder.calls


def _probs(q, k, mask):
    """softmax(q k^T / sqrt(d) + mask) in float64, ``[B, heads, Nq, Nk]``."""
    logits = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1)


def test_prompts_need_the_block_lengths_this_file_is_about(backbone):
    assert (_text_block(backbone, SHORT), _text_block(backbone, LONG)) == (32, 64)
    assert backbone.text_width == 64


@pytest.mark.numeric
@pytest.mark.parametrize("prompt", [SHORT, LONG])
def test_maps_skip_image_padding_and_hold_the_text_keys_at_a_fixed_width(backbone, prompt):
    inputs, maps, calls = _capture(backbone, [prompt])
    assert inputs.grid == (10, 10)
    q, k, v, mask, out = calls[JOINT]
    n_text = _text_block(backbone, prompt)
    assert k.shape[2] == IMG_BLOCK + n_text and mask is None
    p = _probs(q, k, mask)[:, :, :N_IMG]  # image queries
    cross, self_map = maps[f"{JOINT}.map"].double(), maps[f"{JOINT}.self_map"].double()
    assert cross.shape == (1, 2, N_IMG, 64) and self_map.shape == (1, 2, N_IMG, N_IMG)
    torch.testing.assert_close(self_map, p[..., :N_IMG])
    torch.testing.assert_close(cross[..., :n_text], p[..., IMG_BLOCK:])
    assert (cross[..., n_text:] == 0).all()  # columns beyond this prompt's text block: no key, zero probability
    pad = p[..., N_IMG:IMG_BLOCK]  # the image padding tokens' share (attended to, neither image nor text)
    assert float(pad.sum(-1).min()) > 0
    total = self_map.sum(-1) + cross.sum(-1) + pad.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total))
    out_img = self_map @ v[:, :, :N_IMG].double() + cross[..., :n_text] @ v[:, :, IMG_BLOCK:].double()
    out_img = out_img + pad @ v[:, :, N_IMG:IMG_BLOCK].double()
    torch.testing.assert_close(out_img, out[:, :, :N_IMG].double(), atol=1e-5, rtol=1e-4)
    # the image-only refiner block: 100 image queries over the 128-token padded image block
    q, k, _, _, _ = calls[REFINER]
    assert k.shape[2] == IMG_BLOCK
    torch.testing.assert_close(maps[f"{REFINER}.map"].double(), _probs(q, k, None)[:, :, :N_IMG, :N_IMG])


@pytest.mark.numeric
def test_a_batch_of_a_short_and_a_long_prompt_equals_the_single_runs(backbone):
    _, batch, calls = _capture(backbone, [SHORT, LONG])
    assert calls[JOINT][3] is not None  # the short item's batch padding is masked
    for i, prompt in enumerate([SHORT, LONG]):
        _, single, _ = _capture_one(backbone, prompt, seed=i)
        for name, value in single.items():
            torch.testing.assert_close(batch[name][i : i + 1], value, atol=1e-5, rtol=1e-4, msg=name)


def _capture_one(backbone, prompt, seed):
    inputs = backbone.prepare([random_image(40, 40, seed=seed)], [prompt], t=300, resolution=40)
    names = [f"{JOINT}.map", f"{JOINT}.self_map", f"{REFINER}.map", "layers.1"]
    with Capture(backbone, names, inputs, early_exit=False) as cap:
        backbone.denoise(inputs)
    return inputs, cap.activations, None


def test_the_catalog_probe_leaves_no_fake_tensor_in_the_rope_table():
    b = difffeat.load(tiny_pipeline("zimage"), device="cpu", dtype="fp32")
    difffeat.list_activations(b)  # a fake-tensor forward (the first forward of this model)
    from torch._subclasses.fake_tensor import FakeTensor

    table = b.denoiser.rope_embedder.freqs_cis
    assert table is None or not any(isinstance(t, FakeTensor) for t in table)
    inputs = b.prepare([random_image(40, 40)], SHORT, t=300, resolution=40)
    with Capture(b, ["layers.1"], inputs) as cap:
        b.denoise(inputs)
    assert torch.isfinite(cap.activations["layers.1"]).all()
