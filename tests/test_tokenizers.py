"""difffeat.tokenizers: the offline CLIP BPE builder."""

from __future__ import annotations

from difffeat.shapes.captions import vocabulary
from difffeat.tokenizers import BOS, EOS, build_clip_tokenizer


def test_builds_are_identical_and_every_word_is_one_token():
    words = vocabulary()
    builds = [build_clip_tokenizer(words) for _ in range(3)]
    caption = "a red circle and a blue star on a striped green background, zebra!"
    first = builds[0]
    for tok in builds[1:]:
        assert tok.get_vocab() == first.get_vocab()  # ids do not depend on BPE tie-breaking
        assert tok(caption).input_ids == first(caption).input_ids
    assert first.convert_tokens_to_ids([BOS, EOS]) == [0, 1]
    assert all(len(first(w, add_special_tokens=False).input_ids) == 1 for w in words)
    # a word outside the vocabulary splits into pieces, never into <unk>
    pieces = first("zebra", add_special_tokens=False).input_ids
    assert len(pieces) > 1 and first.unk_token_id not in pieces
