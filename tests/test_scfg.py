"""S-CFG parity: difffeat's rate map and guided prediction against an independent transcription of the
published generation code's operations (Darkbblue/goca, generate_for_fid_15.py / generate_for_fid_sigma.py and
gaussian_smoothing.py), on the same tensors, at SD1.5 and PixArt-Sigma geometry, over several steps; and on
the tensors of real (tiny) generations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import difffeat
from difffeat.testing import TINY_CALL_KWARGS
from difffeat.tracing import SCFG, guided_prediction, published_smoothing_kernel, scfg_rate
from difffeat.tracing import session as trace_session


# ----------------------------------------------------------------------------- the transcription
def _published_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """GaussianSmoothing(channels=1, kernel_size, sigma, dim=2).weight, operation by operation: the product over
    both axes of ``1 / (std sqrt(2 pi)) exp(-((mgrid - mean) / (2 std)) ** 2)`` on a meshgrid, divided by its sum."""
    sizes, sigmas = [kernel_size] * 2, [sigma] * 2
    grids = torch.meshgrid([torch.arange(s, dtype=torch.float32) for s in sizes], indexing="ij")
    kernel = 1
    for size, std, mgrid in zip(sizes, sigmas, grids):
        mean = (size - 1) / 2
        kernel = kernel * (1 / (std * math.sqrt(2 * math.pi)) * torch.exp(-(((mgrid - mean) / (2 * std)) ** 2)))
    kernel = kernel / torch.sum(kernel)
    return kernel.view(1, 1, kernel_size, kernel_size)


def _published_guidance(noise_pred: torch.Tensor, ca_mask, fore_mask, guidance_scale: float, r: int):
    """The published denoising step's guidance block with ``use_rate=True`` (returns rate, guided noise)."""
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    mask_t = F.interpolate(ca_mask, r, mode="nearest")
    mask_fore = F.interpolate(fore_mask, r, mode="nearest")
    model_delta = noise_pred_text - noise_pred_uncond
    model_delta_norm = model_delta.norm(dim=1, keepdim=True)
    delta_mask_norms = (model_delta_norm * mask_t).sum([2, 3]) / (mask_t.sum([2, 3]) + 1e-8)
    fore_norms = (model_delta_norm * mask_fore).sum([2, 3]) / (mask_fore.sum([2, 3]) + 1e-8)
    up, down = fore_norms, delta_mask_norms
    tmp_mask = (mask_t.sum([2, 3]) > 0).float()
    rate = up * tmp_mask / (down + 1e-8)
    rate = (rate.unsqueeze(-1).unsqueeze(-1) * mask_t).sum(dim=1, keepdim=True)
    rate = torch.clamp(rate, min=0.8, max=3.0)
    rate = torch.clamp_max(rate, 15.0 / guidance_scale)
    rate = F.pad(rate, (1, 1, 1, 1), mode="reflect")
    rate = F.conv2d(rate, weight=_published_kernel().to(rate.dtype), groups=1)
    rate = rate.to(noise_pred_text.dtype)
    return rate, noise_pred_uncond + guidance_scale * rate * (noise_pred_text - noise_pred_uncond)


def _published_masks(scores_bthw: torch.Tensor, fore_map_hw: torch.Tensor):
    """ca_mask / fore_mask as the published get_mask turns its final maps into masks."""
    max_ca = scores_bthw.max(dim=1)[0].unsqueeze(1)
    ca_mask = (scores_bthw == max_ca).float()
    fore_ca = torch.stack([fore_map_hw, 1 - fore_map_hw]).unsqueeze(0)
    max_fore = fore_ca.max(dim=1)[0].unsqueeze(1)
    fore_mask = 1.0 - (fore_ca == max_fore).float()[:, :1]
    return ca_mask, fore_mask


# ----------------------------------------------------------------------------- tests
def test_the_smoothing_kernel_is_the_published_one():
    torch.testing.assert_close(published_smoothing_kernel(3, 0.5)[None, None], _published_kernel(), rtol=1e-7, atol=0)


#: (channels of the denoiser output, latent side R, mask side, tokens): SD1.5 at 512 px; PixArt-Sigma at 512 px
#: (learned sigma: 8 output channels, the guidance and its norm run over all 8; T5 length 300)
GEOMETRY = {"sd15": (4, 64, 64, 77), "pixart-sigma": (8, 64, 64, 300)}


@pytest.mark.parametrize("geometry", sorted(GEOMETRY))
@pytest.mark.parametrize("step", range(4))
def test_rate_and_guided_prediction_equal_the_published_code(geometry, step):
    c, r, m, t = GEOMETRY[geometry]
    g = torch.Generator().manual_seed(100 * step + len(geometry))
    guidance_scale = [2.0, 3.0, 7.5, 10.0][step]
    noise_pred = torch.randn(2, c, r, r, generator=g)
    noise_pred[1] += 0.3 * step * torch.randn(c, r, r, generator=g)  # steps differ in how far c is from u
    n_content = 6 + step
    scores = torch.zeros(1, t, m, m)
    scores[:, : n_content + 1] = torch.rand(1, n_content + 1, m, m, generator=g)  # pads zeroed
    scores[:, 3, :5, :5] = scores[:, 2, :5, :5]  # a tie
    fore_map = torch.rand(m, m, generator=g)
    ca_mask, fore_mask = _published_masks(scores, fore_map)
    want_rate, want_pred = _published_guidance(noise_pred, ca_mask, fore_mask, guidance_scale, r)

    s = SCFG(guidance_scale)
    u, cond = noise_pred.chunk(2)
    token_mask = F.interpolate(ca_mask, size=(r, r), mode="nearest")
    fore = F.interpolate((fore_map < 1 - fore_map).float()[None, None], size=(r, r), mode="nearest")
    rate = scfg_rate(cond - u, token_mask, fore, s)
    torch.testing.assert_close(rate, want_rate, rtol=1e-6, atol=1e-7)
    assert 0.8 - 1e-6 <= float(rate.min()) and float(rate.max()) <= min(3.0, 15.0 / guidance_scale) + 1e-6
    torch.testing.assert_close(guided_prediction(u, cond, guidance_scale, rate), want_pred, rtol=1e-6, atol=1e-6)


def test_the_clamps_bind(monkeypatch):
    """A region whose guidance norm is far below the foreground's gets the upper clamp (and 15/w caps it);
    one far above gets 0.8: both clamps are exercised, smoothing mixes them only at the border."""
    r = 16
    delta = torch.ones(1, 4, r, r)
    delta[..., :8] *= 100.0  # left half: strong guidance
    masks = torch.zeros(1, 3, r, r)
    masks[:, 1, :, :8] = 1
    masks[:, 2, :, 8:] = 1
    fore = torch.ones(1, 1, r, r)
    for w, upper in ((2.0, 3.0), (7.5, 2.0)):
        rate = scfg_rate(delta, masks, fore, SCFG(w))
        assert torch.allclose(rate[..., 2:6], torch.full_like(rate[..., 2:6], 0.8))
        assert torch.allclose(rate[..., 10:14], torch.full_like(rate[..., 10:14], upper))


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_a_guided_generation_applies_the_published_rule_at_every_step(tiny_pipes, monkeypatch, family):
    """In real (tiny) generations: at every step, the rate difffeat applied and the prediction the pipeline
    went on with equal the transcription's on that step's denoiser output and masks."""
    pipe = tiny_pipes(family)
    seen = []
    real_rate = trace_session.scfg_rate

    def spy(delta, token_mask, fore_mask, s):
        rate = real_rate(delta, token_mask, fore_mask, s)
        seen.append({"token_mask": token_mask, "fore_mask": fore_mask, "rate": rate})
        return rate

    def after(module, args, kwargs, output):
        seen[-1]["pred"] = output[0] if isinstance(output, tuple) else output.sample

    monkeypatch.setattr(trace_session, "scfg_rate", spy)
    outputs = []
    den = difffeat.load(pipe).denoiser
    tc = difffeat.trace(pipe, "a photo of a cat and a dog", ["cat", "dog"], guidance=SCFG(4.0, "scfg-goca"))
    # the denoiser's raw output: a hook registered before the trace's runs before it
    raw = den.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o.sample).clone()))
    try:
        with tc:
            handle = den.register_forward_hook(after, with_kwargs=True)
            kwargs = dict(num_inference_steps=3, height=64, width=64, output_type="np", guidance_scale=4.0)
            kwargs.update(TINY_CALL_KWARGS.get(family, {}))
            pipe("a photo of a cat and a dog", generator=torch.Generator().manual_seed(0), **kwargs)
            handle.remove()
    finally:
        raw.remove()
    assert len(seen) == 3 and len(outputs) == 3
    for rec, noise_pred in zip(seen, outputs):
        r = noise_pred.shape[-1]
        want_rate, want_pred = _published_guidance(noise_pred, rec["token_mask"], rec["fore_mask"], 4.0, r)
        torch.testing.assert_close(rec["rate"], want_rate, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rec["pred"], torch.cat([want_pred, want_pred]), rtol=1e-6, atol=1e-6)


def test_token_masks_take_each_pixels_strongest_content_token_and_the_background_token_for_the_foreground():
    from difffeat.tracing import token_masks

    a_cond = torch.full((1, 6, 8, 8), 0.1)
    a_cond[:, 2, :, :4] = 0.9  # token 2 dominates the left half
    a_cond[:, 3, :, 4:] = 0.9  # token 3 the right half
    a_cond[:, 5] = 5.0  # a padding token after the last content token: never chosen
    a_uncond = torch.zeros(1, 6, 8, 8)
    a_uncond[:, 0, :4] = 1.0  # the start token of the unconditional half covers the top half: background
    tokens, fore = token_masks(a_cond, a_uncond, None, [1, 2, 3], 3, ("uncond", 0), rescale=False, blur_kernel=1)
    assert torch.equal(tokens[0, 2], (torch.arange(8) < 4).float().expand(8, 8))
    assert torch.equal(tokens[0, 3], (torch.arange(8) >= 4).float().expand(8, 8))
    assert tokens[0, 5].sum() == 0
    assert torch.equal(fore[0, 0], (torch.arange(8) >= 4).float()[:, None].expand(8, 8))
