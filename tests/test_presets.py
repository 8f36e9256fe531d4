"""Presets name activations that exist in the real architectures, with the channels and resolutions the
papers report. Real-size denoisers are built on the meta device (no memory, no weights) and shapes come from
a fake-tensor forward."""

from __future__ import annotations

import pytest

import difffeat
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from difffeat.architectures import architecture
from difffeat.catalog import Catalog, enumerate_activations
from difffeat.errors import ConfigError
from difffeat.hookpoints import load_table
from difffeat.presets import list_presets, load_preset

def _config(arch: str) -> dict:
    """The real-size denoiser config shipped in configs/architectures (the source the benchmarks use too)."""
    comps = architecture(arch)["components"]
    return next(comps[k]["config"] for k in ("unet", "transformer") if k in comps)


SD15_UNET = _config("sd15")
SD21_UNET = _config("sd21")
SDXL_UNET = _config("sdxl")
PIXART_SIGMA = _config("pixart")
SD3_MEDIUM = _config("sd3")
FLUX_DEV = _config("flux")


def _meta(cls_name: str, config: dict):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**config)


def _catalog(model, table: str) -> Catalog:
    return Catalog(table, load_table(table), enumerate_activations(model, load_table(table)))


def _unet_feature_shapes(unet, names, cross_dim, sdxl=False):
    """[C, H, W] of each named activation from a fake-tensor forward of a meta UNet at native size."""
    cat = _catalog(unet, "unet")
    infos = [cat[n] for n in names]
    shapes, handles = {}, []
    for info in infos:
        module = unet.get_submodule(info.hook_module)

        def hook(m, a, out, info=info):
            out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            if out.ndim == 3:  # [B, N, C] at a square grid
                side = int(round(out.shape[1] ** 0.5))
                shapes[info.name] = (out.shape[2], side, side)
            else:
                shapes[info.name] = tuple(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    s = unet.config.sample_size
    with FakeTensorMode(allow_non_fake_inputs=True):
        kwargs = {}
        if sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, 1280, device="meta"), "time_ids": torch.empty(1, 6, device="meta")}
        unet(torch.empty(1, 4, s, s, device="meta"), torch.tensor([50], device="meta"),
             encoder_hidden_states=torch.empty(1, 77, cross_dim, device="meta"), **kwargs)
    for h in handles:
        h.remove()
    return [tuple(int(x) for x in shapes[i.name]) for i in infos]


def test_sd15_practical_preset_matches_the_paper_channels_and_resolutions():
    unet = _meta("UNet2DConditionModel", SD15_UNET)
    preset = load_preset("sd15-practical")
    shapes = _unet_feature_shapes(unet, preset.features, 768)
    assert shapes == [(1280, 16, 16), (1280, 16, 16), (640, 32, 32), (320, 64, 64)]


def test_sdxl_practical_preset_matches_the_paper_channels_and_resolutions():
    unet = _meta("UNet2DConditionModel", SDXL_UNET)
    preset = load_preset("sdxl-practical")
    shapes = _unet_feature_shapes(unet, preset.features, 2048, sdxl=True)
    assert shapes == [(1280, 32, 32), (1280, 32, 32), (640, 64, 64), (640, 64, 64)]


def test_legacy_presets_have_the_reference_channel_totals():
    sd15 = _unet_feature_shapes(_meta("UNet2DConditionModel", SD15_UNET), load_preset("sd15-legacy").features, 768)
    assert [s[0] for s in sd15] == [1280, 1280, 640, 320]
    sdxl = _unet_feature_shapes(_meta("UNet2DConditionModel", SDXL_UNET), load_preset("sdxl-legacy").features, 2048, sdxl=True)
    assert sum(s[0] for s in sdxl) == 2240


@pytest.mark.parametrize(
    "preset, cls_name, config, table",
    [
        ("sd21-practical", "UNet2DConditionModel", SD21_UNET, "unet"),
        ("pixart-practical", "PixArtTransformer2DModel", PIXART_SIGMA, "pixart"),
        ("sd3-practical", "SD3Transformer2DModel", SD3_MEDIUM, "sd3"),
        ("flux-practical", "FluxTransformer2DModel", FLUX_DEV, "flux"),
    ],
)
def test_unvalidated_presets_name_existing_activations_and_say_so(preset, cls_name, config, table):
    p = load_preset(preset)
    assert p.validated is False
    cat = _catalog(_meta(cls_name, config), table)
    for name in p.features:
        assert name in cat, name


def test_every_preset_file_loads():
    names = list_presets()
    assert {"sd15-practical", "sd15-legacy", "sdxl-practical", "sdxl-legacy"} <= set(names)
    for name in names:
        assert load_preset(name).features


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match="sd15-practical"):
        load_preset("sd15-practcal")


def test_paper_filtering_flags_on_sd15():
    cat = _catalog(_meta("UNet2DConditionModel", SD15_UNET), "unet")
    assert "noisy-kind" in cat["up-level1-repeat1-res-increment"].flags
    assert "no-position" in cat["up-level1-repeat1-vit-block0-cross-q"].flags
    assert "up-early" in cat["up-level1-repeat1-vit-block0-cross-q"].flags
    assert "down-stage-noise" in cat["down-level1-repeat0-vit-block0-cross-q"].flags
    assert "up-late-noise" in cat["up-level3-repeat2-vit-out"].flags
    practical = {cat.canonical(n) for n in load_preset("sd15-practical").features}
    candidates = {a.name for a in cat.candidates()}
    # the paper's recommendation survives the filtering, except the 64x64 self-k it keeps for locality
    assert practical - candidates <= {cat.canonical("up-level3-repeat0-vit-block0-self-k")}


def test_sdxl_recommendation_survives_the_filtering():
    cat = _catalog(_meta("UNet2DConditionModel", SDXL_UNET), "unet")
    practical = {cat.canonical(n) for n in load_preset("sdxl-practical").features}
    assert practical <= {a.name for a in cat.candidates()}
    assert "late-block" in cat["up-level0-repeat0-vit-block9-out"].flags


def test_shapes_presets_resolve_on_the_shipped_model_and_match_the_benchmark():
    """shapes-practical is the greedy selection benchmarks/features_shapes.py measured, shapes-legacy its
    conventional baseline; both name activations of the shipped model with the channels their files state."""
    import json
    from pathlib import Path

    import difffeat

    results = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "features_shapes.json").read_text())
    sel = results["selections"]
    assert list(load_preset("shapes-practical").features) == sel["greedy selection (val)"]["features"]
    assert list(load_preset("shapes-legacy").features) == sel["conventional: upsampler outputs + last up ViT output"]["features"]
    assert sel["greedy selection (val)"]["test_miou"] > sel["conventional: upsampler outputs + last up ViT output"]["test_miou"]
    cat = difffeat.list_activations(difffeat.load("shapes", device="cpu"))
    for name, channels in (("shapes-practical", 256), ("shapes-legacy", 320)):
        preset = load_preset(name)
        assert preset.family == "sd" and preset.models == ("shapes",) and preset.resolution == 64
        assert sum(cat[n].channels for n in preset.features) == channels


def test_preset_for_another_architecture_names_the_presets_that_fit():
    import difffeat
    from difffeat.presets import presets_for

    backbone = difffeat.load("shapes", device="cpu")
    assert presets_for(backbone) == ["shapes-legacy", "shapes-practical"]
    with pytest.raises(ConfigError) as err:  # same family (sd), other architecture: activations missing
        difffeat.FeatureExtractor(backbone, preset="sd15-practical")
    msg = str(err.value)
    assert "stable-diffusion-v1-5" in msg and "up-level1-repeat2-res-out" in msg and "shapes-legacy, shapes-practical" in msg
    fx = difffeat.FeatureExtractor(backbone, preset="shapes-practical")  # a fitting one loads
    assert fx.names == [difffeat.list_activations(backbone)[f].name for f in load_preset("shapes-practical").features]


def test_recommended_preset_is_the_models_own_practical_one():
    import difffeat
    from difffeat.presets import recommended_preset

    assert recommended_preset(difffeat.load("shapes", device="cpu")) == "shapes-practical"
