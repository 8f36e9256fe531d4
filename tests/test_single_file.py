"""Single-file checkpoints in the original (non-diffusers) key layouts of SD 1.x, SD 2.x, SDXL, SD3 / SD3.5 and
FLUX.1 load through diffusers' from_single_file with a local config folder, offline, from the API and the CLI,
to the very weights and activations of the pipeline they were written from; missing or unusable configs are
clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import difffeat
from difffeat.cli import app
from difffeat.errors import ModelNotFoundError
from _helpers import assert_close_to_rounding
from difffeat.testing import save_single_file, save_tiny_pipeline, single_file_pipeline, tiny_pipeline

runner = CliRunner()

#: a key each layout's file must hold (the original names, as the released files have them)
ORIGINAL_KEYS = {
    "sd": ["model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
           "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"],
    "sd2": ["model.diffusion_model.input_blocks.1.1.proj_in.weight", "cond_stage_model.model.positional_embedding",
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"],
    "sdxl": ["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.transformer.resblocks.4.mlp.c_proj.bias"],
    "sd3": ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.final_layer.adaLN_modulation.1.bias",
            "text_encoders.clip_g.transformer.text_projection.weight", "text_encoders.t5xxl.transformer.shared.weight"],
    "sd35": ["model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight", "model.diffusion_model.joint_blocks.1.context_block.attn.ln_q.weight"],
}  # fmt: skip
#: (layout, denoiser_only) cases of the default suite; FLUX (only convertible at 3072 wide) is the slow test below
CASES = [("sd", False), ("sd2", False), ("sdxl", False), ("sd3", False), ("sd35", False), ("sd3", True)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(layout, denoiser_only) -> (file, config folder), written once per module."""
    cache: dict = {}

    def get(layout: str, denoiser_only: bool = False):
        if (layout, denoiser_only) not in cache:
            root = tmp_path_factory.mktemp(f"{layout}{'-denoiser' if denoiser_only else ''}")
            file = save_single_file(layout, root / "model.safetensors", seed=1, config=root / "config",
                                    denoiser_only=denoiser_only)
            cache[layout, denoiser_only] = file, root / "config"
        return cache[layout, denoiser_only]

    return get


def _keys(file) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("layout", list(ORIGINAL_KEYS))
def test_the_file_uses_the_original_key_layout(layout, written):
    keys = _keys(written(layout)[0])
    assert set(ORIGINAL_KEYS[layout]) <= keys
    assert not any(k.startswith(("unet.", "transformer.", "down_blocks", "vae.", "text_encoder.", "text_encoder_")) for k in keys)
    if layout.startswith("sd3"):  # the MMDiT's own names (CompVis UNets keep diffusers-like attention names)
        assert not any("transformer_blocks" in k or ".to_q." in k for k in keys)


def test_a_denoiser_only_file_holds_the_denoiser_and_its_config_the_rest(written):
    file, config = written("sd3", True)
    assert all(k.startswith("model.diffusion_model.") for k in _keys(file))
    assert not list((config / "transformer").glob("*.safetensors"))  # only its config.json
    assert list((config / "vae").glob("*.safetensors")) and list((config / "text_encoder_3").glob("*.safetensors"))


def _activation_names(backbone) -> list[str]:
    """A block output, a query and a cross-attention map of the model (one of each kind present)."""
    cat = difffeat.list_activations(backbone)
    picked = {}
    for info in cat:
        for kind in ("cross-q", "joint-q", "cross-map", "resnet-out", "block-out"):
            if info.kind == kind and kind not in picked:
                picked[kind] = info.name
    assert len(picked) >= 2, [a.kind for a in cat]
    return list(picked.values())


@pytest.mark.numeric
@pytest.mark.parametrize("layout,denoiser_only", CASES, ids=[f"{l}{'-denoiser' if d else ''}" for l, d in CASES])
def test_a_single_file_loads_the_weights_and_activations_of_its_pipeline(layout, denoiser_only, written):
    file, config = written(layout, denoiser_only)
    loaded = difffeat.load(file, config=config, device="cpu", dtype="fp32")
    source = difffeat.load(single_file_pipeline(layout, seed=1), device="cpu", dtype="fp32")
    assert loaded.family == source.family
    for name, module in source.pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            got, want = getattr(loaded.pipeline, name).state_dict(), module.state_dict()
            assert got.keys() == want.keys(), name
            assert all(torch.equal(got[k], want[k]) for k in want), name
    names = _activation_names(loaded)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = difffeat.FeatureExtractor(loaded, names, t=200)(image, "a cat on the grass")
    want = difffeat.FeatureExtractor(source, names, t=200)(image, "a cat on the grass")
    # the two models hold the same weights in other allocations, so kernels may take other vectorised paths and
    # round differently: compare against the float64 recomputation, within a few times fp32's own rounding error
    exact = difffeat.load(single_file_pipeline(layout, seed=1), device="cpu", dtype=torch.float64)
    ref = difffeat.FeatureExtractor(exact, names, t=200)(image.double(), "a cat on the grass")
    for name in names:
        assert_close_to_rounding(got[name], want[name], ref[name], msg=name)


def test_the_file_wins_over_weights_in_the_config_folder(tmp_path):
    file = save_single_file("sd", tmp_path / "model.safetensors", seed=1)
    config = save_tiny_pipeline("sd", tmp_path / "config", seed=0)  # a complete folder with other weights
    backbone = difffeat.load(file, config=config, device="cpu", dtype="fp32")
    want = tiny_pipeline("sd", seed=1)
    for name in ("unet", "vae", "text_encoder"):
        got, ref = getattr(backbone.pipeline, name).state_dict(), getattr(want, name).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


def test_catalog_reads_a_single_file_with_model_config(written):
    file, config = written("sd")
    result = runner.invoke(app, ["catalog", str(file), "--model-config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    names = {a["name"] for a in json.loads(result.stdout)}
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.map" in names


def test_extract_segment_eval_and_gate_take_model_and_model_config(written, tmp_path):
    from PIL import Image

    file, config = written("sd")
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    model = ["--model-config", str(config)]
    runs = {
        "extract": ["extract", str(file), str(image), *model, "-f", "down_blocks.0.resnets.0", "-o", str(tmp_path / "x"),
                    "--num-workers", "0"],
        "segment": ["segment", str(image), "-c", "circle", "-m", str(file), *model, "-o", str(tmp_path / "s"),
                    "--num-workers", "0"],
        "eval": ["eval", "-m", str(file), *model, "--shapes-split", "test", "--n", "1", "--out", str(tmp_path / "e"),
                 "--num-workers", "0"],
        "gate": ["gate", str(file), str(image), *model, "--technique", "prompt:quality=natural", "--no-img2img",
                 "-f", "down_blocks.0.resnets.0", "--out", str(tmp_path / "g")],
    }
    for command, args in runs.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "x" / "img.safetensors").is_file()
    assert (tmp_path / "s" / "img_labels.png").is_file()
    assert json.loads((tmp_path / "e" / "report.json").read_text())["n_images"] == 1
    assert (tmp_path / "g" / "gate.json").is_file()


def test_a_single_file_without_config_says_how_to_pass_it(written, tmp_path):
    file, config = written("sd")
    with pytest.raises(ModelNotFoundError, match=r"--model-config.*config="):
        difffeat.load(file, device="cpu")
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        difffeat.load(file, config=tmp_path, device="cpu")  # a folder that is no diffusers pipeline
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        difffeat.load(tmp_path / "missing.safetensors", config=config, device="cpu")


def test_a_config_of_another_family_names_both(written, tmp_path):
    file, _ = written("sd")
    flux = save_tiny_pipeline("flux", tmp_path / "flux")
    with pytest.raises(ModelNotFoundError, match="UNet2DConditionModel.*FluxPipeline.*FluxTransformer2DModel"):
        difffeat.load(file, config=flux, device="cpu")
    pixart = save_tiny_pipeline("pixart", tmp_path / "pixart")
    with pytest.raises(ModelNotFoundError, match="PixArtTransformer2DModel"):
        difffeat.load(file, config=pixart, device="cpu")


@pytest.mark.slow
def test_a_flux_single_file_loads_at_the_smallest_width_diffusers_converts(tmp_path):
    """diffusers' FLUX converter splits the single blocks' fused linear1 at inner_dim 3072 (hard-coded), so the
    smallest convertible FLUX.1 transformer is 3072 wide (1 + 1 blocks, ~0.5 G parameters, bf16 ~1 GB; 3.1 GB
    peak memory, under a minute). A tiny one fails inside that split."""
    file = save_single_file("flux", tmp_path / "flux1.safetensors", seed=1, config=tmp_path / "config")
    assert "double_blocks.0.img_attn.qkv.weight" in _keys(file) and "single_blocks.0.linear1.weight" in _keys(file)
    loaded = difffeat.load(file, config=tmp_path / "config", device="cpu", dtype="bf16")
    source = difffeat.load(single_file_pipeline("flux", seed=1), device="cpu", dtype="bf16")
    got, want = loaded.pipeline.transformer.state_dict(), source.pipeline.transformer.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    names = [a.name for a in difffeat.list_activations(loaded) if a.kind in ("joint-q", "cross-map")][:2]
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = difffeat.FeatureExtractor(loaded, names, t=200, resolution=64)(image, "a cat")
    b = difffeat.FeatureExtractor(source, names, t=200, resolution=64)(image, "a cat")
    assert len(names) == 2
    assert all(torch.equal(a[n], b[n]) for n in names)


def test_a_torch_ckpt_archive_loads_like_the_safetensors_file(written, tmp_path):
    from difffeat.testing import original_state_dict

    _, config = written("sd")
    source = single_file_pipeline("sd", seed=1)
    torch.save({"state_dict": original_state_dict(source, "sd")}, tmp_path / "model.ckpt")  # Lightning-style nesting
    loaded = difffeat.load(tmp_path / "model.ckpt", config=config, device="cpu", dtype="fp32")
    got = loaded.pipeline.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.unet.state_dict().items())


def test_the_demo_loads_a_single_file_with_its_model_config(written):
    """``difffeat demo --model FILE --model-config DIR``: the demo's model cache loads the file with its config
    (the same weights as the API's load), and without the config the load names the fix."""
    from difffeat.demo import ModelCache

    file, config = written("sd")
    served = ModelCache(fallback=False, model_configs={str(file): str(config)}).get(str(file)).backbone
    direct = difffeat.load(file, config=config)
    for (name, mine), theirs in zip(served.denoiser.state_dict().items(), direct.denoiser.state_dict().values()):
        assert torch.equal(mine, theirs), name
    with pytest.raises(ModelNotFoundError, match="config"):
        ModelCache(fallback=False).get(str(file))
