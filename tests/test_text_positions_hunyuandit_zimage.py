"""Class tokens of a GOCA prompt sit where the pipelines put them: HunyuanDiT's keys are its BERT tokens
(77, [CLS] first) then its mT5 tokens; Z-Image's are the prompt's tokens inside Qwen's chat template (the
pipeline's own ``apply_chat_template`` call, ``enable_thinking=True``), padding dropped."""

from __future__ import annotations

from difffeat.segment import build_layout

from _helpers import backbone_for

CLASSES = ["cat", "zebra"]


def _ids_at(tokenizer, text, positions):
    ids = tokenizer(text)["input_ids"]
    return [tokenizer.convert_ids_to_tokens(ids[p]) for p in positions]


def test_hunyuandit_class_tokens_index_the_bert_then_the_mt5_keys(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "hunyuandit")
    pipe = backbone.pipeline
    layout = build_layout(CLASSES, backbone.text_segments())
    assert backbone.denoiser.config.text_len == 77
    for name, positions in zip(CLASSES, layout.class_tokens):
        bert = [p for p in positions if p < 77]
        t5 = [p - 77 for p in positions if p >= 77]
        assert _ids_at(pipe.tokenizer, layout.caption, bert) == [name]
        assert _ids_at(pipe.tokenizer_2, layout.caption, t5) == ["▁" + name]


def test_zimage_class_tokens_index_the_chat_templated_prompt(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "zimage")
    tok = backbone.pipeline.tokenizer
    layout = build_layout(CLASSES, backbone.text_segments())
    messages = [{"role": "user", "content": layout.caption}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    for name, positions in zip(CLASSES, layout.class_tokens):
        assert _ids_at(tok, text, positions) == [name]
    assert max(p for g in layout.class_tokens for p in g) < len(tok(text)["input_ids"]) <= backbone.text_width
