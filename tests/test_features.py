"""FeatureExtractor: batching, seeding, presets, saving, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import difffeat
from difffeat import FeatureExtractor, upsample_concat
from difffeat.errors import (
    InvalidImageError,
    InvalidTimestepError,
    ModelNotFoundError,
    UnknownActivationError,
    UnsupportedBackboneError,
)

from _helpers import FAMILIES, backbone_for, random_image


@pytest.fixture(params=FAMILIES)
def backbone(request, tiny_pipes):
    return backbone_for(tiny_pipes, request.param)


def _some_features(backbone, n=3):
    cat = difffeat.list_activations(backbone)
    kinds = ("block-out", "cross-q", "joint-q", "cross-map", "resnet-out")
    return [a.name for a in cat if a.kind in kinds][:n]


@pytest.mark.numeric
def test_batch_of_n_equals_n_single_runs(backbone):
    fx = FeatureExtractor(backbone, _some_features(backbone), batch_size=3, t=50)
    images = [random_image(64, 64, seed=s) for s in range(3)]
    prompts = ["a cat", "a dog on grass", "a red car"]
    batched = fx(images, prompts)
    for i in range(3):
        single = fx([images[i]], [prompts[i]])
        for name in fx.names:
            torch.testing.assert_close(batched[name][i : i + 1], single[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.numeric
def test_same_seed_same_features_and_other_seed_differs(backbone):
    names = _some_features(backbone, 1)
    image = random_image(64, 64)
    a = FeatureExtractor(backbone, names, seed=3)(image, "a cat")[names[0]]
    b = FeatureExtractor(backbone, names, seed=3)(image, "a cat")[names[0]]
    c = FeatureExtractor(backbone, names, seed=4)(image, "a cat")[names[0]]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_prompt_changes_cross_attention_features(backbone):
    name = next(a.name for a in difffeat.list_activations(backbone) if a.kind == "cross-map")
    fx = FeatureExtractor(backbone, [name])
    image = random_image(64, 64)
    assert not torch.allclose(fx(image, "a cat")[name], fx(image, "a dog on a sofa")[name])


def test_maps_come_back_head_averaged_as_key_channels(backbone):
    info = next(a for a in difffeat.list_activations(backbone) if a.kind == "cross-map")
    feats = FeatureExtractor(backbone, [info.name])(random_image(64, 64), "a cat")[info.name]
    heads, hw, keys = info.shape
    assert feats.shape[1] == keys and feats.shape[2] * feats.shape[3] == hw


def test_upsample_concat_stacks_channels_at_the_largest_size():
    feats = {"a": torch.randn(2, 3, 4, 4), "b": torch.randn(2, 5, 8, 8)}
    out = upsample_concat(feats)
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(out[:, 3:], feats["b"])


def test_run_extract_writes_one_safetensors_per_image(tmp_path, tiny_pipes):
    from difffeat.runs import ExtractJob, collect_images, run_extract

    backbone = backbone_for(tiny_pipes, "sd")
    paths = []
    for i, size in enumerate([(64, 64), (48, 80), (64, 64)]):
        p = tmp_path / f"img{i}.png"
        random_image(*size, seed=i).save(p)
        paths.append(p)
    names = _some_features(backbone, 2)
    fx = FeatureExtractor(backbone, names, batch_size=2)
    run_extract(fx, collect_images(paths), ExtractJob(tmp_path / "out", prompt="a photo", num_workers=0, progress=False))
    written = sorted((tmp_path / "out").glob("*.safetensors"))
    assert [w.name for w in written] == ["img0.safetensors", "img1.safetensors", "img2.safetensors"]
    with safe_open(str(tmp_path / "out" / "img1.safetensors"), "pt") as f:
        assert set(f.keys()) == set(names)
        t = f.get_tensor(names[0])
        assert t.ndim == 3 and t.shape[2] > t.shape[1]  # 48x80 image keeps its aspect
        assert '"t": 50' in f.metadata()["t"] or f.metadata()["t"] == "50"
    assert not list((tmp_path / "out").glob("*.part"))
    # the written tensor equals a direct extraction of that image
    direct = fx([paths[1]], "a photo")[names[0]][0]
    torch.testing.assert_close(t, direct)


def test_paper_alias_resolves_to_canonical_name(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    fx = FeatureExtractor(backbone, ["up-level0-repeat1-vit-block0-cross-q"])
    assert fx.names == ["up_blocks.0.attentions.1.transformer_blocks.0.attn2.q"]


# ---------------------------------------------------------------------------- bad input
def test_unknown_activation_lists_close_matches(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    with pytest.raises(UnknownActivationError) as err:
        FeatureExtractor(backbone, ["up_blocks.0.attentions.1.transformer_blocks.0.attn2.qq"])
    msg = str(err.value)
    assert "up_blocks.0.attentions.1.transformer_blocks.0.attn2.q" in msg and "difffeat catalog" in msg


def test_empty_feature_list_is_rejected(tiny_pipes):
    with pytest.raises(ValueError, match="empty feature list"):
        FeatureExtractor(backbone_for(tiny_pipes, "sd"), [])


@pytest.mark.parametrize("t", [-1, 1000, 5000, 2.5])
def test_timestep_outside_range_is_rejected(tiny_pipes, t):
    backbone = backbone_for(tiny_pipes, "sd")
    with pytest.raises(InvalidTimestepError, match=r"\[0, 999\]"):
        FeatureExtractor(backbone, _some_features(backbone, 1), t=t)


def test_corrupt_and_empty_image_files_are_rejected(tmp_path, tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    fx = FeatureExtractor(backbone, _some_features(backbone, 1))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(InvalidImageError, match="empty"):
        fx([empty])
    with pytest.raises(InvalidImageError, match="corrupt or not an image"):
        fx([corrupt])
    with pytest.raises(InvalidImageError, match="not found"):
        fx([tmp_path / "missing.png"])


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        difffeat.load("./no/such/model/folder", device="cpu")


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        difffeat.load(tmp_path, device="cpu")


def test_local_folder_loads_with_pipeline_kwargs_and_names_a_missing_variant(tiny_pipes, tmp_path):
    """``variant=`` reaches from_pretrained for local folders too; without it, the error says what to pass."""
    tiny_pipes("sd").save_pretrained(tmp_path, variant="fp16")
    backbone = difffeat.load(tmp_path, device="cpu", dtype="fp32", variant="fp16")
    assert backbone.family == "sd"
    with pytest.raises(ModelNotFoundError, match=r"variant\(s\) \['fp16'\]: pass variant='fp16'"):
        difffeat.load(tmp_path, device="cpu", dtype="fp32")


def test_loading_prints_no_torchvision_fallback_notice(tmp_path):
    """diffusers' pipeline modules import CLIPImageProcessor; without torchvision transformers printed a notice
    on every load. Fresh process: the notice is printed once per process."""
    import subprocess
    import sys

    code = "import difffeat, logging; difffeat.load('shapes', device='cpu'); " \
           "print(logging.getLogger('transformers.utils.import_utils').filters)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "falling back to" not in proc.stderr
    assert proc.stdout.strip() == "[]"  # the filter is removed after loading


def test_unsupported_pipeline_class_names_supported_ones():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(UnsupportedBackboneError, match="StableDiffusionPipeline"):
        difffeat.load(pipe)


def test_images_of_different_sizes_in_one_tensor_call_say_what_to_do(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    fx = FeatureExtractor(backbone, _some_features(backbone, 1))
    with pytest.raises(InvalidImageError, match="square=True"):
        fx([random_image(64, 64), random_image(32, 96)])


def test_prompt_count_must_match_image_count(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    fx = FeatureExtractor(backbone, _some_features(backbone, 1))
    with pytest.raises(difffeat.InvalidPromptError, match="one per image"):
        fx([random_image(64, 64)] * 2, ["a", "b", "c"])
