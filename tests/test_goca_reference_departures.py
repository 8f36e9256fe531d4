"""The last departures of ``--config goca-reference`` from the published run, each a named setting with the
published value as its default there (issue 28, item 4): SD1.5's timestep 101, VAE posterior sample vs mean,
and build_layout's filler list."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from _helpers import backbone_for, random_image
from difffeat.segment.settings import SegmentSettings, settings_for


def _img2img_first_timestep(pipeline_cls, scheduler, strength: float = 0.1) -> int:
    """The timestep the published extractor runs at: the diffusers img2img pipeline's own get_timesteps on
    the model's scheduler, 1000 steps, strength t/1000 (generic-diffusion-feature's diffusion_feature.py)."""
    scheduler.set_timesteps(1000, device="cpu")
    timesteps, _ = pipeline_cls.get_timesteps(SimpleNamespace(scheduler=scheduler), 1000, strength, "cpu")
    return int(timesteps[0])


def test_sd15_reference_runs_at_the_timestep_pndm_img2img_returns():
    from diffusers import PNDMScheduler, StableDiffusionImg2ImgPipeline

    # SD1.5's scheduler config (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json)
    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)  # fmt: skip
    published = _img2img_first_timestep(StableDiffusionImg2ImgPipeline, pndm)
    assert published == 101
    assert settings_for("stable-diffusion-v1-5", "sd", "goca-reference").t == published
    assert SegmentSettings().t == 100  # difffeat's own default stays t=100


def test_sdxl_reference_timestep_equals_euler_img2img():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading", interpolation_type="linear")  # fmt: skip
    assert settings_for("sdxl-base", "sdxl", "goca-reference").t == _img2img_first_timestep(StableDiffusionXLImg2ImgPipeline, euler)


def test_reference_configs_draw_latents_from_the_posterior():
    for family in ("sd", "sdxl", "flux"):
        assert settings_for("m", family, "goca-reference").vae_latents == "sample"
        assert settings_for("m", family, "goca-reference").resize == "square"
    assert SegmentSettings().vae_latents == "mean" and SegmentSettings().resize == "keep"


def test_posterior_sample_equals_diffusers_retrieve_latents_and_is_batch_independent(tiny_pipes):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    from difffeat.backbones.base import POSTERIOR_SEED_XOR

    backbone = backbone_for(tiny_pipes, "sd")
    vae = backbone.pipeline.vae
    pixels = backbone.preprocess([random_image(32, 32, seed=3)])
    seed = 7
    with torch.no_grad():
        ref = retrieve_latents(vae.encode(pixels), generator=torch.Generator("cpu").manual_seed(seed ^ POSTERIOR_SEED_XOR))
    ours = backbone.sample_latents(pixels, seed)
    assert torch.equal(ours, ref * vae.config.scaling_factor)
    assert not torch.equal(ours, backbone.encode_image(pixels))
    two = backbone.sample_latents(torch.cat([pixels, pixels]), seed)
    assert torch.allclose(two[0], ours[0], atol=1e-6) and torch.allclose(two[1], ours[0], atol=1e-6)


def test_segmenter_vae_latents_setting_reaches_the_forward(tiny_pipes):
    import difffeat

    backbone = backbone_for(tiny_pipes, "sd")
    image = random_image(32, 32, seed=4)
    _, mean_inputs = difffeat.Segmenter(backbone).prepare(image, ["cat"])
    _, sample_inputs = difffeat.Segmenter(backbone, vae_latents="sample").prepare(image, ["cat"])
    pixels = backbone.preprocess([image])
    assert torch.equal(mean_inputs.latents, backbone.encode_image(pixels).to(backbone.dtype))
    assert torch.equal(sample_inputs.latents, backbone.sample_latents(pixels, 0).to(backbone.dtype))
    with pytest.raises(difffeat.errors.ConfigError, match="vae_latents"):
        SegmentSettings(vae_latents="mode")


def test_build_layout_filler_default_is_segment_settings_default():
    from difffeat.segment.prompts import FILLERS, build_layout

    assert inspect.signature(build_layout).parameters["filler"].default is FILLERS[SegmentSettings().filler_words]
