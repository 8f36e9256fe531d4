"""Small offline tokenizers for models trained or built here.

No tokenizer can be downloaded on an offline machine, yet diffusers pipelines need real ones. This module
*trains* a CLIP-compatible byte-level BPE tokenizer on a word list with the ``tokenizers`` library, so the
result is an ordinary :class:`transformers.CLIPTokenizer` (vocab.json + merges.txt) that
``StableDiffusionPipeline.from_pretrained`` loads like any other. Every word of the training list becomes a
single token; any other text still tokenizes (it falls back to byte-level pieces), never to ``<unk>``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = ["build_clip_tokenizer"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# The exact pre-tokenisation of transformers' CLIPTokenizer, so learned merges apply to the same pieces.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _trainer_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


def build_clip_tokenizer(
    words: Iterable[str],
    *,
    model_max_length: int = 77,
    vocab_size: int | None = None,
) -> CLIPTokenizer:
    """Train a CLIP-style BPE tokenizer in which every entry of ``words`` is one token.

    Args:
        words: the vocabulary that must tokenize to single tokens (lower-cased; may contain punctuation
            entries such as ``","``).
        model_max_length: sequence length the text encoder is built for (SD uses 77).
        vocab_size: optional cap; by default merges continue until every word is a single token.

    Returns:
        A :class:`transformers.CLIPTokenizer`. Its ids are dense from 0 and the same on every call:
        ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1, then every other token ordered by (length, text).
    """
    word_list = sorted({w.strip().lower() for w in words if w and w.strip()})
    if not word_list:
        raise ValueError("build_clip_tokenizer needs at least one word")
    byte_chars = sorted(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or 10_000_000,
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=byte_chars,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok = _trainer_tokenizer()
    tok.train_from_iterator(word_list, trainer=trainer)

    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        vocab: dict[str, int] = json.loads(Path(tmp, "vocab.json").read_text())
        merges = [
            line for line in Path(tmp, "merges.txt").read_text().splitlines() if line and not line.startswith("#")
        ]
    # Every byte must exist as a word-final piece too, or unseen words could hit <unk>.
    for ch in byte_chars:
        for piece in (ch, ch + "</w>"):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    # BPE training breaks frequency ties differently from run to run: the vocabulary is the same, its numbering
    # is not. Renumber canonically so that every call gives every token the same id.
    rest = sorted((t for t in vocab if t not in (BOS, EOS)), key=lambda t: (len(t), t))
    ordered = {t: i for i, t in enumerate([BOS, EOS, *rest])}
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=ordered, merges=merge_pairs, model_max_length=model_max_length)
