"""Sana and Lumina 2 (Gemma 2 text): what their attention maps are, checked against the layers' own computation.

Sana's self-attention is ReLU linear attention, so its map is the attention matrix the layer applies (not a
softmax); its cross-attention is softmax. Lumina 2 packs each sample's unpadded text before its image tokens,
so a batch of prompts of different lengths has its image tokens at different positions."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.nn.attention import SDPBackend, sdpa_kernel

import difffeat
from difffeat import Capture
from difffeat.segment.prompts import build_layout

from _helpers import SDPARecorder, backbone_for, random_image


def _inputs(backbone, prompts=("a photo of a cat",), size=(64, 64)):
    return backbone.prepare([random_image(*size, seed=i) for i in range(len(prompts))], list(prompts), t=100)


def _capture(backbone, names, inputs):
    with Capture(backbone, names, inputs, early_exit=False) as cap:
        backbone.denoise(inputs)
    return cap.activations


def _names(backbone, kinds):
    return [a.name for a in difffeat.list_activations(backbone) if a.kind in kinds]


# ------------------------------------------------------------------------------------------------ Sana
@pytest.mark.numeric
def test_sana_linear_self_maps_times_v_reproduce_the_layer_output_before_its_projection(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sana")
    inputs = _inputs(backbone)
    den = backbone.denoiser
    maps = [a for a in difffeat.list_activations(backbone) if a.kind == "self-map"]
    assert maps and all("linear-attention" in a.flags for a in maps)
    seen, handles = {}, []
    for a in maps:
        attn = den.get_submodule(a.module)
        handles.append(attn.register_forward_pre_hook(lambda m, args, path=a.module: seen.__setitem__((path, "in"), args[0])))
        handles.append(attn.to_out[0].register_forward_pre_hook(lambda m, args, path=a.module: seen.__setitem__((path, "out"), args[0])))
    try:
        got = _capture(backbone, [a.name for a in maps], inputs)
    finally:
        for h in handles:
            h.remove()
    for a in maps:
        attn = den.get_submodule(a.module)
        hidden = seen[(a.module, "in")]
        b, n, _ = hidden.shape
        q, k, v = (proj(hidden).view(b, n, attn.heads, -1).transpose(1, 2).double() for proj in (attn.to_q, attn.to_k, attn.to_v))
        probs = got[a.name].double()  # [B, heads, N, N]
        assert probs.min() >= 0
        total = probs.sum(-1)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        expected = seen[(a.module, "out")].double()  # the layer's attention output, before to_out
        torch.testing.assert_close(torch.matmul(probs, v).transpose(1, 2).flatten(2), expected, atol=1e-4, rtol=1e-4)
        softmax = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        assert not torch.allclose(probs, softmax, atol=1e-3)  # a different matrix: the catalog does not call it softmax


@pytest.mark.numeric
def test_sana_cross_maps_are_the_same_with_the_legacy_processor(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sana")
    inputs = _inputs(backbone)
    names = _names(backbone, ("cross-map",))
    reference = _capture(backbone, names, inputs)
    blocks = backbone.denoiser.transformer_blocks
    stock = [blk.attn2.processor for blk in blocks]
    try:
        for blk in blocks:
            blk.attn2.set_processor(AttnProcessor())  # baddbmm + softmax, no SDPA: the processor-level layout
        legacy = _capture(backbone, names, inputs)
    finally:
        for blk, proc in zip(blocks, stock):
            blk.attn2.set_processor(proc)
    for name in names:
        torch.testing.assert_close(legacy[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)


def test_sana_text_positions_are_the_prompt_tokens_behind_the_complex_human_instruction(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sana")
    pipe = backbone.pipeline
    instruction = "\n".join(inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default)
    layout = build_layout(["cat", "dog"], backbone.text_segments())
    # the pipeline's own selection, recomputed: instruction + prompt tokenized, then token 0 and the last n - 1
    n = backbone.max_sequence_length
    n_instruction = len(pipe.tokenizer.encode(instruction))
    ids = pipe.tokenizer(instruction + layout.caption.lower(), padding="max_length", max_length=n_instruction + n - 2,
                         truncation=True)["input_ids"]  # fmt: skip
    seen = [ids[0]] + ids[-n + 1 :]
    for name, positions in zip(layout.classes, layout.class_tokens):
        assert [seen[p] for p in positions] == [pipe.tokenizer.convert_tokens_to_ids(name)], name


def test_sana_instruction_can_be_turned_off(tiny_pipes):
    backbone = difffeat.load(tiny_pipes("sana"), device="cpu", dtype="fp32")
    backbone.max_sequence_length = 32
    with_instruction = backbone.encode_prompt(["a cat"])["encoder_hidden_states"]
    backbone.complex_human_instruction = []
    assert backbone.text_segments()[0].drop == 0 and backbone.text_segments()[0].template == "{}"
    assert backbone.text_segments()[0].lowercase  # as the pipeline lower-cases prompts
    plain = backbone.encode_prompt(["a cat"])["encoder_hidden_states"]
    assert plain.shape == with_instruction.shape and not torch.allclose(plain, with_instruction)


# ------------------------------------------------------------------------------------------------ Lumina 2
LUMINA_PROMPTS = ("a cat", "a photo of a red car on the grass near a big tree")


@pytest.mark.numeric
def test_lumina2_batch_of_prompts_of_different_lengths_equals_single_runs(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "lumina2")
    batch = _inputs(backbone, LUMINA_PROMPTS)
    offsets = batch.image_offsets.tolist()
    assert offsets[0] < offsets[1]  # the image tokens start at different positions
    names = _names(backbone, ("cross-map", "self-map", "block-out", "joint-q", "joint-out", "attended-q", "ff-out"))
    cross_names = _names(backbone, ("cross-map",))
    together = _capture(backbone, names, batch)
    for i, prompt in enumerate(LUMINA_PROMPTS):
        one = backbone.prepare([random_image(64, 64, seed=i)], prompt, t=100)
        alone = _capture(backbone, names, one)
        for name in names:
            torch.testing.assert_close(together[name][i : i + 1], alone[name], atol=1e-5, rtol=1e-4, msg=name)
        for name in cross_names:
            cross = together[name][i]  # [heads, HW, text slots]: zero past the prompt's own tokens
            assert not cross[..., offsets[i] :].any() and cross[..., : offsets[i]].sum() > 0, name


@pytest.mark.numeric
def test_lumina2_packed_maps_times_v_reproduce_the_kernel_output_of_every_sample(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "lumina2")
    inputs = _inputs(backbone, LUMINA_PROMPTS)
    maps = [a for a in difffeat.list_activations(backbone) if a.kind == "cross-map"]
    recorder = SDPARecorder(backbone.denoiser, [a.module for a in maps])
    try:
        got = _capture(backbone, [a.name for a in maps] + [a.module + ".self_map" for a in maps], inputs)
    finally:
        recorder.remove()
    n_img = inputs.grid[0] * inputs.grid[1]
    for a in maps:
        _, _, v, mask, out = (x.double() if x is not None else None for x in recorder.calls[a.module])
        assert mask is not None  # ragged batch: the kernel masks each sample's padding
        for b, c in enumerate(inputs.image_offsets.tolist()):
            p_cross, p_self = got[a.name][b].double(), got[a.module + ".self_map"][b].double()
            total = p_cross.sum(-1) + p_self.sum(-1)
            torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
            expected = p_cross[..., :c] @ v[b, :, :c] + p_self @ v[b, :, c : c + n_img]
            torch.testing.assert_close(expected, out[b, :, c : c + n_img], atol=1e-4, rtol=1e-4, msg=a.name)


def test_lumina2_text_positions_follow_the_system_prompt(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "lumina2")
    pipe = backbone.pipeline
    layout = build_layout(["cat", "dog"], backbone.text_segments())
    ids = pipe.tokenizer(pipe.system_prompt + " <Prompt Start> " + layout.caption, padding="max_length",
                         max_length=backbone.max_sequence_length, truncation=True)["input_ids"]  # fmt: skip
    for name, positions in zip(layout.classes, layout.class_tokens):
        assert [ids[p] for p in positions] == [pipe.tokenizer.convert_tokens_to_ids(name)], name


# ------------------------------------------------------------------------------------------------ both
@pytest.mark.numeric
@pytest.mark.parametrize("family", ["sana", "lumina2"])
def test_maps_are_the_same_under_the_math_and_the_default_cpu_sdpa_kernels(tiny_pipes, family):
    """Both families' processors call torch's SDPA themselves (diffusers' backends do not reach them): the
    observer sees the call whichever kernel torch runs."""
    backbone = backbone_for(tiny_pipes, family)
    inputs = _inputs(backbone)
    names = _names(backbone, ("cross-map", "self-map"))
    reference = _capture(backbone, names + ["output"], inputs)
    with sdpa_kernel(SDPBackend.MATH):
        math = _capture(backbone, names + ["output"], inputs)
    for name in names:
        torch.testing.assert_close(math[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(math["output"], reference["output"], atol=1e-4, rtol=1e-4)


def test_a_lowercasing_segment_counts_tokens_as_the_pipeline_does_with_a_case_sensitive_tokenizer():
    """Sana's pipeline lower-cases the prompt before its (case-sensitive) Gemma tokenizer sees it: "Cat" would
    split into pieces the pipeline never produces and shift every later class's positions."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from difffeat.backbones import TextSegment

    pieces = ["<unk>", "a", "photo", "of", "cat", "dog", ","] + [c for c in "abcdefghijklmnopqrstuvwxyzC"] + ["##" + c for c in "at"]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    layout = build_layout(["Cat", "dog"], [TextSegment(fast, 0, 32, lowercase=True)])
    ids = fast(layout.caption.lower())["input_ids"]
    assert [ids[p] for p in layout.class_tokens[1]] == [fast.convert_tokens_to_ids("dog")]
    cased = build_layout(["Cat", "dog"], [TextSegment(fast, 0, 32)])
    assert cased.class_tokens[1] != layout.class_tokens[1]  # without it the positions are off


@pytest.mark.numeric
def test_lumina2_image_refiner_self_maps_times_v_reproduce_the_kernel_output(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "lumina2")
    inputs = _inputs(backbone, LUMINA_PROMPTS)
    maps = [a for a in difffeat.list_activations(backbone) if a.kind == "self-map" and a.module.startswith("noise_refiner.")]
    assert maps
    recorder = SDPARecorder(backbone.denoiser, [a.module for a in maps])
    try:
        got = _capture(backbone, [a.name for a in maps], inputs)
    finally:
        recorder.remove()
    for a in maps:
        _, _, v, _, out = (x.double() if x is not None else None for x in recorder.calls[a.module])
        probs = got[a.name].double()  # [B, heads, HW, HW]: image tokens only
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(probs @ v, out, atol=1e-4, rtol=1e-4, msg=a.name)
