"""Single-file checkpoints in the original (CompVis) key layout load through diffusers' from_single_file with a
local config folder, offline, from the API and the CLI; missing or unusable configs are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import difffeat
from difffeat.cli import app
from difffeat.errors import ModelNotFoundError
from difffeat.testing import save_single_file, save_tiny_pipeline, tiny_pipeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(file with seed-1 weights in the original layout, config folder with seed-0 weights)."""
    root = tmp_path_factory.mktemp("single")
    return save_single_file("sd", root / "model.safetensors", seed=1), save_tiny_pipeline("sd", root / "config", seed=0)


def test_the_file_uses_the_original_key_layout(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint[0]), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks", "vae.")) for k in keys)


def test_load_single_file_takes_the_weights_from_the_file_and_the_architecture_from_config(checkpoint):
    file, config = checkpoint
    backbone = difffeat.load(file, config=config, device="cpu", dtype="fp32")
    assert backbone.family == "sd"
    want = tiny_pipeline("sd", seed=1)  # the file's weights, not the config folder's (seed 0)
    for name in ("unet", "vae", "text_encoder"):
        got, ref = getattr(backbone.pipeline, name).state_dict(), getattr(want, name).state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


def test_cli_reads_a_single_file_with_config(checkpoint):
    file, config = checkpoint
    result = CliRunner().invoke(app, ["catalog", str(file), "--model-config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    names = {a["name"] for a in json.loads(result.stdout)}
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.map" in names


def test_a_single_file_without_config_says_how_to_pass_it(checkpoint, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"config=.*--model-config"):
        difffeat.load(checkpoint[0], device="cpu")
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        difffeat.load(checkpoint[0], config=tmp_path, device="cpu")  # a folder that is no diffusers pipeline
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        difffeat.load(tmp_path / "missing.safetensors", config=checkpoint[1], device="cpu")
