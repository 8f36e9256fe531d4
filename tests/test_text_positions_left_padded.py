"""Class-token positions in text sequences padded on the left (TextSegment.pad_left: Ideogram 4, CogView4)."""

from __future__ import annotations

import pytest

from difffeat.backbones import TextSegment
from difffeat.errors import InvalidPromptError
from difffeat.segment import build_layout
from difffeat.testing import tiny_chat_tokenizer

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _left_padded_ids(tok, text: str, length: int, drop: int) -> list[int]:
    """The ids the denoiser sees: the text tokenized, its first ``drop`` tokens removed, padded on the left."""
    ids = tok(text)["input_ids"][drop:]
    return [tok.pad_token_id] * (length - len(ids)) + ids


@pytest.mark.parametrize("drop", [0, 2])
def test_left_padded_positions_index_the_class_tokens_in_the_padded_sequence(drop):
    tok = tiny_chat_tokenizer()
    segment = TextSegment(tok, 0, 40, TEMPLATE, drop, pad_left=True)
    layout = build_layout(["cat", "dog"], [segment], "a photo of {}")
    ids = _left_padded_ids(tok, TEMPLATE.format(layout.caption), 40, drop)
    assert [ids[p] for p in layout.class_tokens[0]] == tok("cat", add_special_tokens=False)["input_ids"]
    assert [ids[p] for p in layout.class_tokens[1]] == tok("dog", add_special_tokens=False)["input_ids"]


def test_left_padded_positions_move_with_the_caption_length_and_end_at_the_last_slot():
    tok = tiny_chat_tokenizer()
    segment = TextSegment(tok, 5, 40, "{}", pad_left=True)
    short = build_layout(["cat"], [segment], "{}")
    long = build_layout(["cat"], [segment], "a photo of a {}")
    assert short.class_tokens == [[5 + 39]]  # the only token, in the last slot
    assert long.class_tokens == [[5 + 39]]  # still the last token: the padding in front absorbs the words
    assert build_layout(["cat", "dog"], [segment], "{}").class_tokens == [[5 + 37], [5 + 39]]  # "cat , dog"


def test_a_caption_longer_than_a_left_padded_segment_is_a_clear_error():
    tok = tiny_chat_tokenizer()
    segment = TextSegment(tok, 0, 4, "{}", pad_left=True)
    with pytest.raises(InvalidPromptError, match="4-token limit"):
        build_layout(["cat", "dog", "zebra"], [segment], "a photo of {}")
