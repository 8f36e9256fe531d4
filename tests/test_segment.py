"""Segmenter end to end on every family, the vanilla reduction, outputs, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat import Capture, Segmenter
from difffeat.capture import per_head
from difffeat.errors import InvalidImageError, InvalidPromptError
from difffeat.segment.outputs import save_result, to_coco_results
from difffeat.segment.rescale import gaussian_blur, minmax

from _helpers import FAMILIES, backbone_for, random_image


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["goca", "vanilla"])
def test_segments_on_every_family(tiny_pipes, family, method):
    seg = Segmenter(backbone_for(tiny_pipes, family), method=method)
    result = seg(random_image(48, 80), ["cat", "dog"])
    assert result.labels.shape == (48, 80) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    assert result.class_maps.shape[0] == 2
    assert 0 <= float(result.class_maps.min()) and float(result.class_maps.max()) <= 1 + 1e-6
    weights = np.array(result.layer_weights)
    assert (weights >= 0).all() and abs(weights.sum() - 1) < 1e-5
    assert result.settings["method"] == method


def test_ablation_switches_change_the_maps(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    image = random_image(64, 64)
    maps = {}
    for name, kw in {"vanilla": {"method": "vanilla"}, "heads": {"method": "vanilla", "heads": "goca"},
                     "layers": {"method": "vanilla", "layers": "goca"}, "rescale": {"method": "vanilla", "rescale": "goca"}}.items():
        maps[name] = Segmenter(backbone, **kw)(image, ["cat", "dog"]).class_maps
    for name in ("heads", "layers", "rescale"):
        assert not torch.allclose(maps[name], maps["vanilla"]), name


@pytest.mark.numeric
def test_vanilla_equals_a_direct_computation_from_per_head_maps(tiny_pipes):
    """Vanilla = head mean, uniform layer mean, no rescaling, blur + min-max (refinement off here)."""
    backbone = backbone_for(tiny_pipes, "sd")
    seg = Segmenter(backbone, method="vanilla", refine_order=0)
    image = random_image(64, 64, seed=5)
    result = seg(image, ["cat", "dog"])

    inputs = backbone.prepare([image], result.caption, seg.settings.t, seg.settings.seed)
    with Capture(backbone, seg.cross_names, inputs, early_exit=False, map_reducer=per_head) as cap:
        backbone.denoise(inputs)
    layers = []
    for name in seg.cross_names:
        m = cap.activations[name][0].mean(0)  # [HW, T]
        side = int(m.shape[0] ** 0.5)
        layers.append(F.interpolate(m.T.reshape(1, -1, side, side), size=(32, 32), mode="bilinear", align_corners=False)[0])
    a = torch.stack(layers).mean(0)
    a = a / a.sum(0, keepdim=True)
    tok = backbone.pipeline.tokenizer
    ids = tok(result.caption).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    cat_pos, dog_pos = pieces.index("cat</w>"), pieces.index("dog</w>")
    expected = minmax(gaussian_blur(torch.stack([a[cat_pos], a[dog_pos]])[None], 5, 1.1))[0]
    torch.testing.assert_close(result.class_maps, expected, atol=1e-5, rtol=1e-4)


def test_tau_moves_the_background_decision(tiny_pipes):
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    result = seg(random_image(64, 64), ["cat"])
    assert (result.with_tau(-2.0).labels == 1).all()
    assert (result.with_tau(2.0).labels == 0).all()


def test_rescaling_with_a_single_content_group_is_skipped_with_a_warning(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    image = random_image(64, 64, seed=3)
    plain = Segmenter(backbone, method="vanilla", background_entities=())(image, ["cat"])
    with pytest.warns(UserWarning, match="at least two content groups"):
        rescaled = Segmenter(backbone, method="vanilla", rescale="goca", background_entities=())(image, ["cat"])
    torch.testing.assert_close(rescaled.class_maps, plain.class_maps)  # not a constant (all-zero) map
    assert float(rescaled.class_maps.max()) == pytest.approx(1.0)


def test_outputs_follow_the_cli_contract(tiny_pipes, tmp_path):
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    image = random_image(40, 56)
    result = seg(image, ["cat", "dog"])
    paths = save_result(result, image, tmp_path, "pic", heatmaps=True)
    labels = Image.open(paths["labels"])
    assert labels.mode == "P" and labels.size == (56, 40)
    np.testing.assert_array_equal(np.asarray(labels), result.labels)
    assert Image.open(paths["overlay"]).size == (56, 40)
    meta = json.loads(paths["json"].read_text())
    assert meta["classes"] == {"background": 0, "cat": 1, "dog": 2}
    assert (tmp_path / "pic_heat_cat.png").is_file()
    coco = to_coco_results(result, 7, {"cat": 1, "dog": 2})
    from pycocotools import mask as mask_utils

    for entry in coco:
        decoded = mask_utils.decode({**entry["segmentation"], "counts": entry["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), result.labels == entry["category_id"])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "classes, message",
    [([], "empty class list"), (["cat", "Cat"], "duplicate"), (["cat", "  "], "no letters"), (["..."], "no letters")],
)
def test_bad_class_lists_are_rejected(tiny_pipes, classes, message):
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    with pytest.raises(InvalidPromptError, match=message):
        seg(random_image(32, 32), classes)


def test_class_past_the_token_limit_is_a_clear_error(tiny_pipes):
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    with pytest.raises(InvalidPromptError, match="token limit"):
        seg(random_image(32, 32), [f"thing{i}" for i in range(40)])


@pytest.mark.parametrize("size", [(0, 10), (1, 1)])
def test_degenerate_images_are_rejected(tiny_pipes, size):
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    with pytest.raises(InvalidImageError):
        seg(np.zeros((*size, 3), dtype=np.uint8), ["cat"])


def test_unreadable_file_is_rejected(tiny_pipes, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(InvalidImageError, match="corrupt or not an image"):
        Segmenter(backbone_for(tiny_pipes, "sd"))(bad, ["cat"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_and_16_bit_images_segment(tiny_pipes, tmp_path, mode):
    arr = (np.random.default_rng(0).random((40, 40)) * (65535 if mode == "I;16" else 255)).astype(np.uint16 if mode == "I;16" else np.uint8)
    img = Image.fromarray(arr) if mode != "RGBA" else Image.fromarray(np.dstack([arr] * 4))
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    img.save(path)
    result = Segmenter(backbone_for(tiny_pipes, "sd"))(path, ["cat"])
    assert result.labels.shape == (40, 40)


def test_huge_image_is_downscaled_with_a_warning_not_an_oom(tiny_pipes):
    big = Image.new("RGB", (8000, 8000), (120, 30, 200))
    with pytest.warns(UserWarning, match="downscaled"):
        result = Segmenter(backbone_for(tiny_pipes, "sd"))(big, ["cat"])
    assert result.labels.shape == (8000, 8000)  # decided at the 4096 px it was loaded at, written at its own size


def test_bad_head_reducers_are_clear_errors_and_leave_no_hooks(tiny_pipes):
    from difffeat.errors import ConfigError, UnknownActivationError
    from difffeat.segment import FixedHeadWeights

    backbone = backbone_for(tiny_pipes, "sd")
    seg = Segmenter(backbone, heads="mean")
    image = random_image(64, 64)
    name = seg.cross_names[0]
    with pytest.raises(UnknownActivationError) as err:  # a typo: the message lists the close matches
        seg.observe(image, ["cat"], head_reducers={name.replace("attn2", "attn3"): FixedHeadWeights([1.0])})
    assert name in str(err.value) and "cross_names" in str(err.value)
    with pytest.raises(ConfigError, match="not a map reducer"):
        seg.observe(image, ["cat"], head_reducers={name: [0.5, 0.5]})
    heads = backbone.denoiser.get_submodule(name.rsplit(".", 1)[0]).heads
    processors = dict(backbone.denoiser.attn_processors)
    with pytest.raises(ConfigError, match=f"1 weight\\(s\\) but the layer has {heads} heads"):
        seg.observe(image, ["cat"], head_reducers={name: FixedHeadWeights([1.0])})  # raised inside the forward
    assert dict(backbone.denoiser.attn_processors) == processors  # observers removed after the error
    assert not any(m._forward_hooks for m in backbone.denoiser.modules())
    goca_obs = Segmenter(backbone, heads="goca").observe(image, ["cat"])
    with pytest.raises(ConfigError, match="cannot be decided with heads='mean'"):
        seg.decide(goca_obs)  # only custom observations cross head settings
