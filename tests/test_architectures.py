"""Real-size architecture configs (configs/architectures/*.json) build the published models: parameter counts
match the numbers published for each model, on the meta device (no memory)."""

from __future__ import annotations

import pytest
import torch

from difffeat.architectures import architecture, architecture_names, build_component, build_denoiser, build_pipeline
from difffeat.errors import ConfigError

# Published parameter counts in millions (model cards / papers), +-1%.
PUBLISHED_M = {
    ("sd15", "unet"): 860, ("sd15", "vae"): 84, ("sd15", "text_encoder"): 123,
    ("sd21", "unet"): 866, ("sd21", "text_encoder"): 340,
    ("sdxl", "unet"): 2567, ("sdxl", "text_encoder_2"): 695,
    ("pixart", "transformer"): 611, ("pixart", "text_encoder"): 4762,
    ("sd3", "transformer"): 2028, ("flux", "transformer"): 11901,
}  # fmt: skip


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_every_family_has_a_real_size_config():
    assert set(architecture_names()) >= {"sd15", "sd21", "sdxl", "pixart", "sd3", "flux"}


@pytest.mark.parametrize("arch, component", sorted(PUBLISHED_M))
def test_parameter_counts_match_the_published_models(arch, component):
    module = build_component(arch, component, device="meta")
    assert module.device.type == "meta"
    assert _millions(module) == pytest.approx(PUBLISHED_M[arch, component], rel=0.01)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux"])
def test_whole_pipelines_build_on_the_meta_device(arch):
    pipe = build_pipeline(arch, device="meta")
    assert type(pipe).__name__ == architecture(arch)["pipeline"]
    denoiser = pipe.transformer if arch == "flux" else pipe.unet
    assert dict(build_denoiser(arch).config) == dict(denoiser.config)


def test_text_layers_caps_the_text_encoders_only():
    full = build_component("pixart", "text_encoder", device="meta")
    short = build_component("pixart", "text_encoder", device="meta", text_layers=2)
    assert len(short.encoder.block) == 2 < len(full.encoder.block)
    assert short.config.d_model == full.config.d_model == 4096


def test_bad_names_are_clear_errors():
    with pytest.raises(ConfigError, match="shipped architectures: .*sd15"):
        architecture("sd99")
    with pytest.raises(ConfigError, match="has no component 'unet'"):
        build_component("flux", "unet", device="meta")
