"""Tracing a generation: observation never changes the images; a traced step's maps are Capture's on the same
inputs; hooks go away; bad input fails clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import difffeat
from difffeat.backbones.base import DenoiserInputs
from difffeat.errors import DifffeatError, InvalidOptionError, InvalidPromptError
from difffeat.testing import TINY_CALL_KWARGS
from difffeat.tracing import SCFG, ClassNotInPromptWarning

PROMPT = "a photo of a cat and a dog"
CLASSES = ["cat", "dog"]


def _call(pipe, family, prompt=PROMPT, seed=0, steps=3, **kw):
    kwargs = dict(num_inference_steps=steps, height=64, width=64, output_type="np", guidance_scale=5.0)
    kwargs.update(TINY_CALL_KWARGS.get(family, {}))
    if family in ("pixart", "sd3"):
        kwargs["max_sequence_length"] = 32
    kwargs.update(kw)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _hook_count(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("family", ["sd", "pixart", "sdxl", "sd3"])
def test_tracing_does_not_change_the_generated_images(tiny_pipes, family):
    pipe = tiny_pipes(family)
    untraced = _call(pipe, family)
    den = difffeat.load(pipe).denoiser
    before = _hook_count(den)
    with difffeat.trace(pipe, PROMPT, CLASSES) as tc:
        traced = _call(pipe, family)
    assert np.array_equal(traced, untraced)
    assert tc.traced_steps == 3
    assert _hook_count(den) == before  # every hook removed


def test_trace_gives_a_label_map_and_heat_maps_per_image(tiny_pipes):
    pipe = tiny_pipes("sd")
    with difffeat.trace(pipe, [PROMPT, "a cat on a bed"], [CLASSES, ["cat", "bed"]], num_images_per_prompt=2) as tc:
        images = _call(pipe, "sd", prompt=[PROMPT, "a cat on a bed"], num_images_per_prompt=2)
    results = tc.results([Image.fromarray((im * 255).astype(np.uint8)) for im in images])
    assert len(results) == 4
    assert results[0].classes == ["cat", "dog"] and results[2].classes == ["cat", "bed"]
    for r in results:
        assert r.labels.shape == (64, 64) and r.labels.max() <= len(r.classes)
        heat = r.heatmap(r.classes[0])
        assert heat.shape == (64, 64) and 0 <= heat.min() and heat.max() <= 1
    # images of one prompt differ (different noise), so do their maps
    assert not torch.equal(results[0].class_maps, results[1].class_maps)


def test_a_traced_step_equals_capture_on_the_same_inputs(tiny_pipes):
    """Trace step k of a CFG generation; then observe the denoiser inputs recorded at step k (latents,
    timestep, prompt embeddings) with Capture outside any generation. On the whole CFG batch the same kernels
    run on the same data: the class maps are equal. The Segmenter's own forward on the conditional half alone
    (batch 1, fused attention output) agrees to float32 rounding, amplified by GOCA's per-pixel rescaling and
    min-max: maps within 1e-2, labels on >= 98% of pixels."""
    from difffeat.capture import Capture, head_mean
    from difffeat.segment.segmenter import goca_scores

    pipe = tiny_pipes("sd")
    k = 1
    recorded = {"n": 0}
    den = pipe.unet

    def record(module, args, kwargs):
        if recorded["n"] == k:
            recorded.update(sample=args[0].detach().clone(), t=args[1], ehs=kwargs["encoder_hidden_states"].detach().clone())
        recorded["n"] += 1

    tc = difffeat.trace(pipe, PROMPT, CLASSES, steps=[k], activations=["up_blocks.1.resnets.2"])
    handle = den.register_forward_pre_hook(record, with_kwargs=True)  # after the trace's catalog probe
    try:
        with tc:
            _call(pipe, "sd")
    finally:
        handle.remove()
    traced = tc.result(0)
    assert tc.traced_steps == 1 and list(tc.features) == [k]
    seg = tc.segmenter
    # 1. Capture on the whole recorded batch: equal
    names = seg.activation_names() + ["up_blocks.1.resnets.2"]
    reducers, stream = seg.observation_reducers((32, 32))
    with Capture(seg.backbone, names, grid=(32, 32), early_exit=False, map_reducer=head_mean, map_reducers=reducers) as cap:
        with torch.no_grad():
            den(recorded["sample"], recorded["t"], encoder_hidden_states=recorded["ehs"], return_dict=False)
    acts = {n: v[1:] for n, v in cap.activations.items()}
    refine = stream.finish(acts, tuple(acts[seg.ref_name].shape[-2:])) if stream else None
    cls, _, _ = goca_scores(seg.settings, tc.layouts[0], acts, (32, 32), seg.cross_names, seg.self_names, seg.ref_name,
                            seg.refine_names, refine)
    assert torch.equal(traced.class_maps, cls[0])
    assert torch.equal(tc.features[k]["up_blocks.1.resnets.2"], acts["up_blocks.1.resnets.2"])
    # 2. the Segmenter's observed forward on the conditional half alone
    inputs = DenoiserInputs(
        kwargs=dict(sample=recorded["sample"][1:], timestep=recorded["t"], encoder_hidden_states=recorded["ehs"][1:]),
        layout=seg.backbone.layout((32, 32), {"encoder_hidden_states": recorded["ehs"][1:]}), timestep=int(recorded["t"]),
        image_size=(64, 64), prompts=[PROMPT],
    )
    direct = seg.decide(seg.observe_prepared([Image.new("RGB", (64, 64))], [tc.layouts[0]], inputs)[0])
    torch.testing.assert_close(traced.class_maps, direct.class_maps, atol=1e-2, rtol=0)
    assert (traced.labels == direct.labels).mean() >= 0.98


def test_a_class_absent_from_the_prompt_warns_with_the_prompts_words(tiny_pipes):
    with pytest.warns(ClassNotInPromptWarning, match=r"'horse'.*its words: a, photo, of, a, cat, and, a, dog"):
        tc = difffeat.trace(tiny_pipes("sd"), PROMPT, ["cat", "horse"])
    assert tc.classes == [["cat"]]
    with pytest.raises(InvalidPromptError, match="none of the classes"):
        difffeat.trace(tiny_pipes("sd"), PROMPT, ["horse"])


def test_steps_outside_the_schedule_fail_before_any_observation(tiny_pipes):
    pipe = tiny_pipes("sd")
    den = pipe.unet
    before = _hook_count(den)
    with pytest.raises(InvalidOptionError, match=r"outside the schedule: this call denoises in 3 steps"):
        with difffeat.trace(pipe, PROMPT, CLASSES, steps=[1, 5]):
            _call(pipe, "sd")
    assert _hook_count(den) == before
    with pytest.raises(InvalidOptionError, match="step indices >= 0"):
        difffeat.trace(pipe, PROMPT, CLASSES, steps=[-1])


def test_a_family_without_text_cross_attention_is_refused():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(DifffeatError):
        difffeat.trace(pipe, "a cat", ["cat"])


def test_a_family_with_packed_latents_is_refused_at_its_first_step(tiny_pipes):
    from difffeat.errors import UnsupportedBackboneError

    pipe = tiny_pipes("flux")
    with pytest.raises(UnsupportedBackboneError, match=r"\[B, C, H, W\] latent"):
        with difffeat.trace(pipe, PROMPT, CLASSES):
            pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np", **TINY_CALL_KWARGS.get("flux", {}))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_scfg_without_cfg_is_refused(scale):
    with pytest.raises(InvalidOptionError, match="guidance_scale > 1"):
        SCFG(scale)


@pytest.mark.parametrize("family", ["sd", "pixart", "sdxl", "sd3"])
def test_cfg_guidance_equals_the_pipelines_own_output_bit_for_bit(tiny_pipes, family):
    pipe = tiny_pipes(family)
    plain = _call(pipe, family)
    with difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(5.0, "cfg")):
        guided = _call(pipe, family)
    assert np.array_equal(guided, plain)


@pytest.mark.parametrize("mode", ["scfg-goca", "scfg"])
def test_scfg_guides_the_generation_and_leaves_the_pipeline_unchanged_after(tiny_pipes, mode):
    pipe = tiny_pipes("sd")
    plain = _call(pipe, "sd")
    with difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(5.0, mode)) as tc:
        guided = _call(pipe, "sd")
    assert not np.array_equal(guided, plain)
    assert tc.traced_steps == 3
    assert np.array_equal(_call(pipe, "sd"), plain)


def test_guidance_on_a_call_without_cfg_is_refused(tiny_pipes):
    pipe = tiny_pipes("sd")
    with pytest.raises(InvalidOptionError, match="guidance_scale > 1"):
        with difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(5.0, "scfg-goca")):
            _call(pipe, "sd", guidance_scale=1.0)


def test_fused_output_tracing_changes_images_only_at_float32_rounding(tiny_pipes):
    pipe = tiny_pipes("sd")
    untraced = _call(pipe, "sd")
    with difffeat.trace(pipe, PROMPT, CLASSES, fuse_output=True) as tc:
        fused = _call(pipe, "sd")
    assert tc.traced_steps == 3
    np.testing.assert_allclose(fused, untraced, atol=1e-4)


# ----------------------------------------------------------------------------- aggregation over steps
def _traced_with_inputs(pipe, steps, **trace_kw):
    """Trace a 3-step CFG generation and record the denoiser inputs (latents, timestep, prompt embeddings) of
    every step."""
    recorded = []

    def record(module, args, kwargs):
        recorded.append((args[0].detach().clone(), args[1], kwargs["encoder_hidden_states"].detach().clone()))

    tc = difffeat.trace(pipe, PROMPT, CLASSES, steps=steps, **trace_kw)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)  # after the trace's catalog probe
    try:
        with tc:
            _call(pipe, "sd")
    finally:
        handle.remove()
    return tc, recorded


def _capture_step(seg, inputs, names=None):
    """Capture (outside any generation) on one recorded step's whole CFG batch: the conditional half's
    activations and streamed refinement mean."""
    from difffeat.capture import Capture, head_mean
    from difffeat.segment.selfmaps import mean_self_map

    sample, t, ehs = inputs
    reducers, stream = seg.observation_reducers((32, 32))
    with Capture(seg.backbone, names or seg.activation_names(), grid=(32, 32), early_exit=False, map_reducer=head_mean,
                 map_reducers=reducers) as cap:
        with torch.no_grad():
            seg.backbone.denoiser(sample, t, encoder_hidden_states=ehs, return_dict=False)
    acts = {n: v[1:] for n, v in cap.activations.items()}
    if stream is not None:
        return acts, stream.finish(acts, tuple(acts[seg.ref_name].shape[-2:]))
    mass = seg.settings.self_map_resize == "mass-preserving"  # the maps kept whole: their mean, as goca_scores takes it
    return acts, mean_self_map(acts, seg.refine_names, (32, 32), (32, 32), mass) if seg.settings.refine_order > 0 else None


@pytest.mark.parametrize("self_step", [None, 0])
def test_maps_aggregation_is_goca_on_the_step_mean_cross_maps_with_the_self_steps_weights(tiny_pipes, self_step):
    """aggregate="maps" (the default): per layer, the cross maps of the traced steps are averaged; GOCA's
    decision runs once on that mean with the layer weights and refinement mean of the self step (default: the
    traced step whose timestep is nearest the settings' t). Recomputed here from Capture on the recorded
    inputs of each step (the same kernels on the same data): equal."""
    from difffeat.segment.segmenter import goca_layer_weights, goca_scores

    pipe = tiny_pipes("sd")
    steps = [0, 2]
    tc, recorded = _traced_with_inputs(pipe, steps, self_step=self_step)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    seg = tc.segmenter
    expected_self = self_step if self_step is not None else min(steps, key=lambda i: abs(timesteps[i] - seg.settings.t))
    assert tc.used_self_step == expected_self and tc.traced_steps == 2
    observed = {k: _capture_step(seg, recorded[k]) for k in steps}
    mean = {n: (observed[0][0][n] + observed[2][0][n]) / 2 for n in seg.cross_names}
    acts, refine = observed[expected_self]
    weights = goca_layer_weights(seg.settings, acts, (32, 32), seg.cross_names, seg.self_names, seg.ref_name)
    cls, support, _ = goca_scores(seg.settings, tc.layouts[0], mean, (32, 32), seg.cross_names, seg.self_names,
                                  seg.ref_name, seg.refine_names, refine, weights=weights)
    result = tc.result(0)
    assert torch.equal(result.class_maps, cls[0]) and torch.equal(result.support, support[0])
    assert result.layer_weights == [float(w) for w in weights[0]]
    assert result.settings["aggregate"] == "maps" and result.settings["self_step"] == expected_self


def test_steps_aggregation_averages_goca_decisions_of_every_traced_step(tiny_pipes):
    """aggregate="steps": each traced step decided on its own maps (its own layer weights and refinement), the
    class scores averaged: equal to the mean of GOCA's decisions on Capture of each recorded step."""
    from difffeat.segment.segmenter import goca_scores

    pipe = tiny_pipes("sd")
    tc, recorded = _traced_with_inputs(pipe, [0, 2], aggregate="steps")
    seg = tc.segmenter
    per_step = []
    for k in (0, 2):
        acts, refine = _capture_step(seg, recorded[k])
        cls, _, _ = goca_scores(seg.settings, tc.layouts[0], acts, (32, 32), seg.cross_names, seg.self_names,
                                seg.ref_name, seg.refine_names, refine)
        per_step.append(cls[0])
    assert tc.used_self_step is None and tc.traced_steps == 2
    assert torch.equal(tc.result(0).class_maps, (per_step[0] + per_step[1]) / 2)


def test_capture_of_some_samples_equals_the_whole_batchs_rows(tiny_pipes):
    """Capture(batch=slice) computes maps and features of those samples only, equal to the whole batch's rows
    (the same kernels on the same data); the forward itself is untouched."""
    from difffeat.capture import Capture, head_mean

    pipe = tiny_pipes("sd")
    backbone = difffeat.load(pipe)
    seg = difffeat.Segmenter(backbone)
    names = seg.activation_names() + ["up_blocks.1.resnets.2"]
    gen = torch.Generator().manual_seed(0)
    sample, ehs = torch.randn(2, 4, 32, 32, generator=gen), torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    outs, acts = [], []
    for batch in (None, slice(1, 2)):
        with Capture(backbone, names, grid=(32, 32), early_exit=False, map_reducer=head_mean, batch=batch) as cap:
            with torch.no_grad():
                outs.append(pipe.unet(sample, 10, encoder_hidden_states=ehs, return_dict=False)[0])
        acts.append(cap.activations)
    assert torch.equal(outs[0], outs[1])
    for n in names:
        assert acts[1][n].shape[0] == 1
        assert torch.equal(acts[1][n], acts[0][n][1:])


def test_bad_aggregation_settings_are_refused_before_any_observation(tiny_pipes):
    pipe = tiny_pipes("sd")
    with pytest.raises(InvalidOptionError, match="aggregate must be one of maps, steps"):
        difffeat.trace(pipe, PROMPT, CLASSES, aggregate="mean")
    with pytest.raises(InvalidOptionError, match="not one of the traced steps"):
        difffeat.trace(pipe, PROMPT, CLASSES, steps=[1, 2], self_step=0)
    with pytest.raises(InvalidOptionError, match='aggregate="maps"'):
        difffeat.trace(pipe, PROMPT, CLASSES, aggregate="steps", self_step=0)
    with pytest.raises(InvalidOptionError, match="step index >= 0"):
        difffeat.trace(pipe, PROMPT, CLASSES, self_step=-1)
    den = pipe.unet
    before = _hook_count(den)
    with pytest.raises(InvalidOptionError, match=r"self_step 7 is outside the schedule: this call denoises in 3 steps"):
        with difffeat.trace(pipe, PROMPT, CLASSES, self_step=7):
            _call(pipe, "sd")
    assert _hook_count(den) == before
