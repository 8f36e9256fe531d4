"""Behaviour particular to single 2026 families (what the family-parametrised suite cannot state)."""

from __future__ import annotations

import torch

import difffeat

from _helpers import backbone_for, random_image
from difffeat.capture import Capture


def test_hunyuanimage_leaving_out_the_all_masked_glyph_block_changes_nothing_the_image_sees(tiny_pipes):
    """Without quoted text the pipeline feeds a ByT5 block that is masked everywhere; the adapter leaves it out.
    Masked keys get exactly zero probability, so the denoiser's output equals the pipeline-style call to float32
    summation order."""
    backbone = backbone_for(tiny_pipes, "hunyuanimage")
    inputs = backbone.prepare([random_image(64, 64)], "a cat on a sofa", t=500)
    assert "encoder_hidden_states_2" not in inputs.kwargs
    pipe = backbone.pipeline
    _, _, glyph, glyph_mask = pipe.encode_prompt(prompt=["a cat on a sofa"], device="cpu", batch_size=1)
    assert not glyph_mask.any()
    with torch.no_grad():
        ours = backbone.denoise(inputs)[0]
        theirs = pipe.transformer(**inputs.kwargs, encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask,
                                  return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_hunyuanimage_quoted_text_adds_the_glyph_block_to_the_cross_maps(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "hunyuanimage")
    image = random_image(64, 64)
    plain = backbone.prepare([image], "a sign", t=500)
    quoted = backbone.prepare([image], 'a sign that says "stop"', t=500)
    n_glyph = backbone.pipeline.tokenizer_2_max_length
    assert quoted.layout.text_len == plain.layout.text_len + n_glyph
    name = "transformer_blocks.0.attn.map"
    with Capture(backbone, [name], quoted) as cap:
        backbone.denoise(quoted)
    maps = cap.activations[name]  # [B, heads, HW, text keys]
    assert maps.shape[-1] == quoted.layout.text_len
    assert torch.all(maps >= 0) and torch.all(maps.sum(-1) <= 1 + 1e-5)


def test_ideogram4_class_positions_index_the_class_tokens_of_the_pipelines_left_padded_text(tiny_pipes):
    from difffeat.segment import build_layout

    backbone = backbone_for(tiny_pipes, "ideogram4")
    layout = build_layout(["cat", "dog"], backbone.text_segments(), "a photo of {}")
    tok, n = backbone.pipeline.tokenizer, backbone.max_sequence_length
    # the pipeline's own text ids: the chat-formatted prompt, right-aligned in its n slots
    messages = [{"role": "user", "content": [{"type": "text", "text": layout.caption}]}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    slots = [None] * (n - len(ids)) + ids
    assert [slots[p] for p in layout.class_tokens[0]] == tok("cat", add_special_tokens=False)["input_ids"]
    assert [slots[p] for p in layout.class_tokens[1]] == tok("dog", add_special_tokens=False)["input_ids"]


def test_ideogram4_left_padding_gets_no_attention_from_the_image(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "ideogram4")
    inputs = backbone.prepare([random_image(64, 64)], "a cat", t=500)
    name = "layers.0.attention.map"
    with Capture(backbone, [name], inputs) as cap:
        backbone.denoise(inputs)
    maps = cap.activations[name]  # [B, heads, HW, text slots]
    n_pad = int((inputs.kwargs["indicator"][0, : maps.shape[-1]] != 3).sum())  # slots before the prompt's tokens
    assert n_pad > 0 and not maps[..., :n_pad].any() and maps[..., n_pad:].sum() > 0


def test_cogview4_class_positions_index_the_class_tokens_of_the_left_padded_glm_input(tiny_pipes):
    from difffeat.segment import build_layout

    backbone = backbone_for(tiny_pipes, "cogview4")
    layout = build_layout(["cat", "dog"], backbone.text_segments(), "a photo of {}")
    tok, n = backbone.pipeline.tokenizer, backbone.text_segments()[0].max_length
    ids = tok([layout.caption], padding="max_length", max_length=n, return_tensors="pt", padding_side="left").input_ids[0]
    assert ids[0] == tok.pad_token_id and ids[-n:].shape[0] == n  # padded in front, as the pipeline pads
    assert [int(ids[p]) for p in layout.class_tokens[0]] == tok("cat", add_special_tokens=False)["input_ids"]
    assert [int(ids[p]) for p in layout.class_tokens[1]] == tok("dog", add_special_tokens=False)["input_ids"]


def test_cogview4_one_prompt_at_its_own_padded_length_is_the_pipelines_conditioning(tiny_pipes):
    """With max_sequence_length at the prompt's token count rounded up to 16, the adapter's text states are the
    pipeline's own (its `_get_glm_embeds`)."""
    backbone = backbone_for(tiny_pipes, "cogview4")
    pipe, before = backbone.pipeline, backbone.max_sequence_length
    n = len(pipe.tokenizer("a cat on a sofa")["input_ids"])
    try:
        backbone.max_sequence_length = -(-n // 16) * 16
        ours = backbone.encode_prompt(["a cat on a sofa"])["encoder_hidden_states"]
    finally:
        backbone.max_sequence_length = before
    with torch.no_grad():
        theirs = pipe._get_glm_embeds(["a cat on a sofa"], device="cpu", dtype=torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_hidream_probe_puts_every_mixture_of_experts_back(tiny_pipes):
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    import difffeat

    backbone = backbone_for(tiny_pipes, "hidream")
    before = {n: m for n, m in backbone.denoiser.named_modules() if isinstance(m, MOEFeedForwardSwiGLU)}
    assert before
    with backbone.probe_context():
        assert not any(isinstance(m, MOEFeedForwardSwiGLU) for m in backbone.denoiser.modules())
    difffeat.list_activations(backbone)  # the catalog's fake-tensor forward runs inside the same context
    after = {n: m for n, m in backbone.denoiser.named_modules() if isinstance(m, MOEFeedForwardSwiGLU)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_hidream_patch_sequence_input_equals_the_latent_input(tiny_pipes):
    """The adapter feeds the model's own patch sequence with an all-ones token mask (so no size is read back from
    a tensor); for a square image that is the model's unmasked path: keys times one."""
    backbone = backbone_for(tiny_pipes, "hidream")
    inputs = backbone.prepare([random_image(64, 64)], "a cat", t=500)
    latents = backbone.add_noise(inputs.latents, 500, inputs.noise)
    kwargs = {k: v for k, v in inputs.kwargs.items() if k not in ("hidden_states", "hidden_states_masks", "img_sizes", "img_ids")}
    with torch.no_grad():
        ours = backbone.denoise(inputs)[0]
        theirs = backbone.denoiser(hidden_states=latents, return_dict=False, **kwargs)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_cogview4_shared_feed_forward_keeps_its_image_call(tiny_pipes):
    """CogView4's blocks call one feed-forward module on the image tokens, then on the text tokens: its
    activations are the first call's, as a plain forward hook that records every call sees them (the second,
    text-length call would not fit the image grid)."""
    backbone = backbone_for(tiny_pipes, "cogview4")
    inputs = backbone.prepare([random_image(64, 64)], "a cat on a sofa", t=500)
    names = ["transformer_blocks.0.ff", "transformer_blocks.0.ff.inner"]
    assert set(names) <= set(difffeat.list_activations(backbone).names())
    calls: dict[str, list[torch.Tensor]] = {"ff": [], "inner": []}
    block = backbone.denoiser.get_submodule("transformer_blocks.0")
    handles = [
        block.ff.register_forward_hook(lambda m, a, out: calls["ff"].append(out.detach().clone())),
        block.ff.net[0].register_forward_hook(lambda m, a, out: calls["inner"].append(out.detach().clone())),
    ]
    try:
        with Capture(backbone, names, inputs, early_exit=False) as cap:
            backbone.denoise(inputs)
    finally:
        for h in handles:
            h.remove()
    gh, gw = inputs.layout.grid
    assert [c.shape[1] for c in calls["ff"]] == [gh * gw, inputs.layout.text_len]
    for name, key in zip(names, ("ff", "inner")):
        first = calls[key][0]  # [B, HW, C]
        expected = first.transpose(1, 2).reshape(first.shape[0], first.shape[2], gh, gw)
        assert torch.equal(cap.activations[name], expected), name
