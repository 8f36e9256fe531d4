"""Capture: names are capturable, values are right, hooks and processors never leak."""

from __future__ import annotations

import pytest
import torch

import difffeat
from difffeat import Capture
from difffeat.capture import StopForward

from _helpers import FAMILIES, SDPARecorder, attention_modules, backbone_for, random_image


@pytest.fixture(params=FAMILIES)
def backbone(request, tiny_pipes):
    return backbone_for(tiny_pipes, request.param)


def _inputs(backbone, size=(64, 64), prompt="a photo of a cat", seed=0):
    return backbone.prepare([random_image(*size, seed=seed)], prompt, t=100, seed=seed)


def test_every_catalog_name_is_capturable_alone_and_matches_a_full_capture(backbone):
    inputs = _inputs(backbone)
    cat = difffeat.list_activations(backbone)
    with Capture(backbone, cat.names(), inputs, early_exit=False) as full:
        backbone.denoise(inputs)
    assert full.missing == []
    for info in cat:
        with Capture(backbone, [info.name], inputs, early_exit=True) as one:
            backbone.denoise(inputs)
        got = one.activations[info.name]
        torch.testing.assert_close(got, full.activations[info.name], rtol=0, atol=0, msg=info.name)


def test_catalog_shapes_match_captured_shapes_at_probe_resolution(backbone):
    cat = difffeat.list_activations(backbone)
    h, w = cat.probe_size
    inputs = _inputs(backbone, size=(h, w))
    with Capture(backbone, cat.names(), inputs, early_exit=False) as cap:
        backbone.denoise(inputs)
    for info in cat:
        assert tuple(cap.activations[info.name].shape[1:]) == info.shape, info.name


def test_non_square_images_reshape_on_the_true_grid(backbone):
    inputs = _inputs(backbone, size=(48, 96))
    gh, gw = inputs.grid
    assert gw == 2 * gh
    names = [a.name for a in difffeat.list_activations(backbone) if a.kind in ("block-out", "cross-q", "joint-q")][:3]
    with Capture(backbone, names, inputs) as cap:
        backbone.denoise(inputs)
    for name in names:
        h, w = cap.activations[name].shape[-2:]
        assert w == 2 * h, name


def _pre_hook_store(store, key):
    def hook(module, args, kwargs):
        store[key] = (args, kwargs)

    return hook


def test_captured_qkv_equal_recomputation_from_module_input(backbone):
    inputs = _inputs(backbone)
    cat = difffeat.list_activations(backbone)
    qkv = [a for a in cat if a.kind in ("self-q", "self-k", "self-v", "cross-q", "joint-q", "joint-k", "joint-v")]
    assert qkv
    den = backbone.denoiser
    seen, handles = {}, []
    for a in qkv:
        handles.append(den.get_submodule(a.module).register_forward_pre_hook(_pre_hook_store(seen, a.module), with_kwargs=True))
    try:
        with Capture(backbone, [a.name for a in qkv], inputs, early_exit=False) as cap:
            backbone.denoise(inputs)
    finally:
        for h in handles:
            h.remove()
    for a in qkv:
        args, kwargs = seen[a.module]
        hidden = args[0] if args else kwargs["hidden_states"]
        proj = den.get_submodule(a.hook_module)
        expected = proj(hidden)  # [B, N, C]
        n_img = inputs.grid[0] * inputs.grid[1]
        if a.tokens == "joint":  # one sample: a packed sequence ends with its image tokens too
            expected = expected[:, -n_img:] if backbone.token_layout.text_first else expected[:, :n_img]
        got = cap.activations[a.name]  # [B, C, h, w]
        got_seq = got.flatten(2).transpose(1, 2)
        torch.testing.assert_close(got_seq, expected, msg=a.name)


def test_cross_attention_map_times_v_reproduces_attention_output(backbone):
    """For every attention kind (cross, joint image-first / text-first, single-stream, fused projections):
    the captured maps times the values the kernel got reproduce the kernel's output for the image queries
    (the attention output before the output projection), and maps sum to one over all keys."""
    inputs = _inputs(backbone)
    cat = difffeat.list_activations(backbone)
    maps = [a for a in cat if a.kind == "cross-map"]
    assert maps
    text_first = backbone.token_layout.text_first
    recorder = SDPARecorder(backbone.denoiser, [a.module for a in maps])
    names = [a.name for a in maps]
    self_names = [a.module + ".self_map" for a in maps if a.module + ".self_map" in cat]
    try:
        with Capture(backbone, names + self_names, inputs, early_exit=False) as cap:
            backbone.denoise(inputs)
    finally:
        recorder.remove()
    n_img = inputs.grid[0] * inputs.grid[1]
    for a in maps:
        q, k, v, _, out = (x.double() if x is not None else None for x in recorder.calls[a.module])
        p_cross = cap.activations[a.name].double()  # [B, heads, Nq, T]
        n_total = k.shape[2]
        if a.module + ".self_map" not in cat:  # plain cross-attention: every key is text
            expected = torch.matmul(p_cross, v)
            total = p_cross.sum(-1)
            rows = slice(0, q.shape[2])
        else:
            p_self = cap.activations[a.module + ".self_map"].double()
            img = slice(n_total - n_img, n_total) if text_first else slice(0, n_img)
            txt = slice(0, n_total - n_img) if text_first else slice(n_img, n_total)
            n_txt = txt.stop - txt.start  # the kernel's text keys; maps may have more text slots, all zero (Lumina 2)
            assert not p_cross[..., n_txt:].any(), a.name
            p_cross = p_cross[..., :n_txt]
            expected = torch.matmul(p_self, v[:, :, img]) + torch.matmul(p_cross, v[:, :, txt])
            total = p_self.sum(-1) + p_cross.sum(-1)
            rows = img
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        torch.testing.assert_close(expected, out[:, :, rows], atol=1e-4, rtol=1e-4, msg=a.name)


def test_attended_qkv_are_the_image_rows_the_kernel_got(backbone):
    cat = difffeat.list_activations(backbone)
    attended = [a for a in cat if a.kind.startswith("attended-")]
    if not attended:
        pytest.skip("this family lists no attended q/k/v")
    inputs = _inputs(backbone)
    recorder = SDPARecorder(backbone.denoiser, sorted({a.module for a in attended}))
    try:
        with Capture(backbone, [a.name for a in attended], inputs, early_exit=False) as cap:
            backbone.denoise(inputs)
    finally:
        recorder.remove()
    n_img = inputs.grid[0] * inputs.grid[1]
    image = slice(-n_img, None) if backbone.token_layout.text_first else slice(0, n_img)
    for a in attended:
        q, k, v, _, _ = recorder.calls[a.module]
        x = {"attended-q": q, "attended-k": k, "attended-v": v}[a.kind][:, :, image]
        expected = x.transpose(1, 2).flatten(2).transpose(1, 2).reshape(x.shape[0], -1, *inputs.grid)
        torch.testing.assert_close(cap.activations[a.name], expected, rtol=0, atol=0, msg=a.name)


def test_self_attention_maps_sum_to_one_over_keys(backbone):
    inputs = _inputs(backbone)
    maps = [a for a in difffeat.list_activations(backbone) if a.kind == "self-map" and not a.name.endswith("self_map")]
    if not maps:
        pytest.skip("this family's self maps are joint (checked with the cross maps)")
    with Capture(backbone, [a.name for a in maps], inputs, early_exit=False) as cap:
        backbone.denoise(inputs)
    for a in maps:
        s = cap.activations[a.name].sum(-1)
        torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


def test_early_exit_skips_every_module_after_the_last_needed_one(backbone):
    inputs = _inputs(backbone)
    cat = difffeat.list_activations(backbone)
    first = next(a for a in cat if a.kind == "block-out")
    calls = []
    last_module = {"unet": "conv_out", "lumina2": "norm_out", "zimage": "all_final_layer.2-1", "krea2": "final_layer",
                   "ideogram4": "final_layer", "hidream": "final_layer"}.get(
        backbone.hook_table, "proj_out"
    )
    out_module = backbone.denoiser.get_submodule(last_module)
    h = out_module.register_forward_hook(lambda *a: calls.append(1))
    try:
        with Capture(backbone, [first.name], inputs, early_exit=True) as cap:
            backbone.denoise(inputs)
        assert calls == [] and first.name in cap.activations
        with Capture(backbone, [first.name], inputs, early_exit=False):
            backbone.denoise(inputs)
        assert calls == [1]
    finally:
        h.remove()


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_a_forward_that_raises_leaves_no_hooks_and_original_processors(backbone):
    inputs = _inputs(backbone)
    den = backbone.denoiser
    before_hooks = _hook_count(den)
    before_procs = {n: m.processor for n, m in attention_modules(den)}
    names = [a.name for a in difffeat.list_activations(backbone) if a.kind in ("cross-map", "self-map", "block-out")]

    class Boom(RuntimeError):
        pass

    last = list(den.modules())[-1]
    bomb = last.register_forward_hook(lambda *a: (_ for _ in ()).throw(Boom("injected failure")))
    try:
        with pytest.raises(Boom, match="injected failure"):
            with Capture(backbone, names, inputs, early_exit=False):
                assert _hook_count(den) > before_hooks  # observers and feature hooks are installed
                # make sure the failure happens inside the forward: run until the bomb goes off
                backbone.denoise(inputs)
                raise Boom("forward finished without reaching the injected failure")
    finally:
        bomb.remove()
    assert _hook_count(den) == before_hooks
    assert {n: m.processor for n, m in attention_modules(den)} == before_procs


def test_stop_forward_is_swallowed_only_inside_capture(backbone):
    inputs = _inputs(backbone)
    name = difffeat.list_activations(backbone).names()[1]
    with Capture(backbone, [name], inputs) as cap:
        backbone.denoise(inputs)
        pytest.fail("early exit should have left the block")  # pragma: no cover
    assert name in cap.activations
    assert issubclass(StopForward, Exception)
