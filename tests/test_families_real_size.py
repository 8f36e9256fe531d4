"""Real-size architectures of the newer families (configs/architectures/*.json, the published configs) build on
the meta device, and their catalogs list the published block counts, heads and widths with the shapes of a
fake-tensor forward through the family's own adapter at native resolution."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from difffeat.backbones import wrap_pipeline
from difffeat.capture import Capture
from difffeat.catalog import Catalog, enumerate_activations
from difffeat.hookpoints import load_table
from difffeat.resources import data_dir

TEXT_LEN = 16  # text tokens of the probe forward (any length works; shorter is faster)


def _arch(name: str) -> dict:
    return json.loads((data_dir("configs") / "architectures" / f"{name}.json").read_text())


def _meta(spec: dict):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, spec["class"])(**spec["config"])


def _flux2_condition(pipe, denoiser):
    embeds = torch.zeros(1, TEXT_LEN, denoiser.config.joint_attention_dim, device="meta")
    return {"encoder_hidden_states": embeds, "txt_ids": pipe._prepare_text_ids(embeds).to("meta")}


def _qwenimage_condition(pipe, denoiser):
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.joint_attention_dim, device="meta"),
            "encoder_hidden_states_mask": None}  # fmt: skip


#: architecture -> (tiny family whose pipeline carries the real components, text conditioning of the probe,
#: published numbers: blocks per kind, heads, head dim)
CASES = {
    "flux2-dev": ("flux2", _flux2_condition, {"transformer_blocks": 8, "single_transformer_blocks": 48}, 48, 128),
    "flux2-klein-4b": ("flux2", _flux2_condition, {"transformer_blocks": 5, "single_transformer_blocks": 20}, 24, 128),
    "qwen-image": ("qwenimage", _qwenimage_condition, {"transformer_blocks": 60}, 24, 128),
}
#: published transformer sizes, billions of parameters (+-2%)
PUBLISHED_B = {"flux2-dev": 32.2, "flux2-klein-4b": 3.9, "qwen-image": 20.4}


def real_size_catalog(tiny_pipes, name: str) -> tuple[Catalog, dict, tuple[int, int]]:
    """The catalog of architecture ``name`` with shapes, on meta/fake tensors (no memory, no weights)."""
    family, condition, *_ = CASES[name]
    arch = _arch(name)
    pipe = tiny_pipes(family).__class__(**{**tiny_pipes(family).components, **{k: _meta(v) for k, v in arch["components"].items()}})
    backbone = wrap_pipeline(pipe)
    table = load_table(backbone.hook_table)
    infos = enumerate_activations(backbone.denoiser, table)
    res = arch["native_resolution"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        latents = torch.zeros(1, *backbone.latent_shape(res, res), device="meta")
        inputs = backbone.denoiser_inputs(latents, 1, condition(pipe, backbone.denoiser), (res, res))
        with Capture(backbone, infos, inputs, early_exit=False, shapes_only=True) as cap:
            backbone.denoise(inputs)
    shapes = {n: tuple(int(x) for x in s[1:]) for n, s in cap.shapes.items()}
    return Catalog(backbone.family, table, infos), shapes, inputs.grid


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_size_catalog_has_the_published_blocks_heads_and_widths(tiny_pipes, name):
    _, _, blocks, heads, head_dim = CASES[name]
    cat, shapes, (gh, gw) = real_size_catalog(tiny_pipes, name)
    assert gh * 16 == _arch(name)["native_resolution"]  # 1024 px -> 64 x 64 tokens
    assert set(shapes) == set(cat.names())  # the whole catalog ran
    for prefix, count in blocks.items():
        outs = [a for a in cat if a.kind == "block-out" and a.name.startswith(prefix + ".")]
        assert len(outs) == count, prefix
        for a in outs:
            assert shapes[a.name] == (heads * head_dim, gh, gw), a.name
        cross = [a for a in cat if a.kind == "cross-map" and a.name.startswith(prefix + ".")]
        assert len(cross) == count
        assert {shapes[a.name] for a in cross} == {(heads, gh * gw, TEXT_LEN)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_real_size_transformers_have_the_published_parameter_counts(name):
    model = _meta(_arch(name)["components"]["transformer"])
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.02)
