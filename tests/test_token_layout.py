"""TokenLayout: where image and text tokens sit in a forward's sequences, as the adapters declare it."""

from __future__ import annotations

import pytest
import torch

import difffeat
from difffeat.backbones import FAMILIES
from difffeat.backbones.layout import TokenLayout
from difffeat.errors import ConfigError
from difffeat.hookpoints import load_table


def _seq(n: int, b: int = 1) -> torch.Tensor:
    """``[B, n, 1]`` whose token i holds the value i."""
    return torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(b, n, 1)


def test_image_tokens_of_a_joint_sequence_follow_the_order():
    grid = (2, 3)  # 6 image tokens
    x = _seq(10)  # 6 image + 4 text tokens
    assert TokenLayout("image-first").at(grid).image_tokens(x, joint=True).flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert TokenLayout("text-first").at(grid).image_tokens(x, joint=True).flatten().tolist() == [4, 5, 6, 7, 8, 9]
    assert TokenLayout("text-first").at(grid).image_tokens(x, joint=False) is x  # an image-only sequence as it is


def test_packed_layout_takes_each_samples_image_tokens_from_its_offset():
    layout = TokenLayout("text-first", packed=True).at((1, 3), 4, torch.tensor([2, 4]))
    got = layout.image_tokens(_seq(9, b=2), joint=True)[..., 0]
    assert got.tolist() == [[2, 3, 4], [4, 5, 6]]


def _qkv(n: int, heads: int = 2, d: int = 4, b: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    ("layout", "n", "rows", "image", "text"),
    [
        (TokenLayout("image-first").at((2, 2), 3), 7, slice(0, 4), slice(0, 4), slice(4, 7)),
        (TokenLayout("text-first").at((2, 2), 3), 7, slice(3, 7), slice(3, 7), slice(0, 3)),
        (TokenLayout("text-first").at((2, 2), 3), 4, slice(0, 4), slice(0, 4), None),  # self-attention
        (TokenLayout("text-first").at((2, 2), 3), 1, slice(0, 1), slice(0, 1), None),  # a downsampled level
    ],
)
def test_attended_splits_a_call_into_image_queries_and_image_text_keys(layout, n, rows, image, text):
    q, k, v = _qkv(n)
    got = layout.attended(q, k, v)
    assert torch.equal(got.q, q[:, :, rows]) and got.k is k and got.v is v
    assert (got.image_keys, got.text_keys) == (image, text)


def test_attended_cross_attention_keys_are_all_text():
    q, _, _ = _qkv(4)
    _, k, v = _qkv(5, seed=1)
    got = TokenLayout().at((2, 2), 5).attended(q, k, v)
    assert (got.image_keys, got.text_keys) == (None, slice(0, 5)) and torch.equal(got.q, q)


def test_padded_blocks_skip_image_padding_and_pad_text_keys_to_the_text_length():
    layout = TokenLayout("image-first", block_multiple=4).at((1, 3), text_len=8)  # image block: 3 + 1 padding
    q, k, v = _qkv(4 + 4)  # [image x3, pad, text x4]
    got = layout.attended(q, k, v)
    assert got.image_keys == slice(0, 3) and got.text_keys == slice(4, 12)
    assert torch.equal(got.q, q[:, :, :3]) and got.k.shape[2] == 12
    assert torch.isinf(got.bias[..., 8:]).all() and not got.bias[..., :8].any()  # the 4 extra text slots are masked


def test_packed_call_gathers_text_slots_then_image_keys_per_sample():
    layout = TokenLayout("text-first", packed=True).at((1, 2), text_len=3, image_offsets=torch.tensor([1, 3]))
    q, k, v = _qkv(6, b=2)  # sample 0: [t, i, i, pad...]; sample 1: [t, t, t, i, i, pad]
    got = layout.attended(q, k, v)
    assert got.text_keys == slice(0, 3) and got.image_keys == slice(3, 5)
    torch.testing.assert_close(got.q[0], q[0, :, 1:3]) and torch.testing.assert_close(got.q[1], q[1, :, 3:5])
    torch.testing.assert_close(got.k[1, :, :3], k[1, :, :3])
    assert torch.isinf(got.bias[0, 0, 0, 1:3]).all() and not got.bias[1].any()  # sample 0 has one text token


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="image-first"):
        TokenLayout("middle")
    with pytest.raises(ValueError, match="block_multiple"):
        TokenLayout(block_multiple=0)
    with pytest.raises(ValueError, match="text-first"):
        TokenLayout("image-first", packed=True)


@pytest.mark.parametrize("key", ["token_order: text-first", "sequence_multiple: 32"])
def test_a_hook_table_with_layout_keys_is_refused(tmp_path, monkeypatch, key):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "x.yaml").write_text(f"family: x\n{key}\npoints: []\n")
    monkeypatch.setattr("difffeat.hookpoints.data_dir", lambda name: tmp_path / name)
    load_table.cache_clear()
    try:
        with pytest.raises(ConfigError, match="TokenLayout"):
            load_table("x")
    finally:
        load_table.cache_clear()


def test_every_family_declares_a_layout_and_its_joint_rules_need_one():
    for family, adapter in FAMILIES.items():
        assert isinstance(adapter.token_layout, TokenLayout), family
        assert adapter.token_layout.grid is None, family  # the class-level layout has no forward geometry
        table = load_table(adapter.hook_table)
        assert all(r.tokens in ("image", "joint") for p in table.points for r in p.activations), family


def test_denoiser_inputs_carry_the_adapters_layout(tiny_pipes):
    from _helpers import backbone_for

    backbone = backbone_for(tiny_pipes, "flux")
    inputs = backbone.prepare([torch.zeros(3, 64, 64)], "a cat", resolution=64)
    assert inputs.layout.text_first and inputs.grid == inputs.layout.grid == (16, 16)  # 64 px: 32x32 latents in 2x2 patches
    assert inputs.text_len == inputs.kwargs["encoder_hidden_states"].shape[1]
    assert isinstance(difffeat.TokenLayout, type)
