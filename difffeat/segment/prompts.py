"""Prompts for segmentation: the caption naming the classes, and which token positions belong to each class.

Token positions are found by character offsets (``return_offsets_mapping``), so they are right for CLIP's
BPE and T5's sentencepiece alike, for multi-token names, and for names the tokenizer splits oddly. A class
falling past the tokenizer's limit is an error, never a silent truncation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backbones.base import TextSegment
from ..errors import InvalidPromptError

__all__ = ["FILLER_WORDS", "PUBLISHED_FILLER_WORDS", "DEFAULT_FILLER_WORDS", "check_classes"]

#: words that are never content (besides special tokens and bare sentencepiece "▁")
FILLER_WORDS = frozenset({"a", "an", "the", "and", ",", ".", "-", "of", "on", "in", "with"})
#: the filler list of the published GOCA code (its captioner): no "of", "on", "in", "with"
PUBLISHED_FILLER_WORDS = frozenset({"a", "an", "the", "and", ",", ".", "-"})
#: ``SegmentSettings.filler_words`` -> the list
FILLERS = {"difffeat": FILLER_WORDS, "published": PUBLISHED_FILLER_WORDS}
#: the list used when none is named: the one ``SegmentSettings.filler_words`` defaults to ("published")
DEFAULT_FILLER_WORDS = FILLERS["published"]


@dataclass
class PromptLayout:
    """The caption and its token bookkeeping (positions index the denoiser's text sequence).

    Attributes:
        caption: the prompt fed to the model.
        classes: class names, in label order (label i+1 = classes[i]).
        class_tokens: token positions of each class.
        entity_tokens: token positions of each background entity (caption nouns that are not classes).
        content_tokens: every class and entity token position (for per-pixel rescaling).
    """

    caption: str
    classes: list[str]
    class_tokens: list[list[int]]
    entities: list[str] = field(default_factory=list)
    entity_tokens: list[list[int]] = field(default_factory=list)

    @property
    def content_tokens(self) -> list[int]:
        return sorted({t for g in self.class_tokens + self.entity_tokens for t in g})


def check_classes(classes: Sequence[str]) -> list[str]:
    """Validate class names: non-empty list, non-blank names with a letter or digit, no duplicates."""
    if isinstance(classes, str):
        classes = [c for c in classes.split(",")]
    names = [str(c).strip() for c in classes]
    if not names:
        raise InvalidPromptError("empty class list: name at least one class, e.g. --classes cat,dog")
    for raw, name in zip(classes, names):
        if not re.search(r"\w", name):
            raise InvalidPromptError(f"class name {raw!r} has no letters or digits, so it has no tokens to attend to")
    lowered = [n.lower() for n in names]
    dupes = sorted({n for n in lowered if lowered.count(n) > 1})
    if dupes:
        raise InvalidPromptError(f"duplicate class names {dupes}; name each class once")
    return names


def _is_content_piece(token: str, filler: frozenset[str] = DEFAULT_FILLER_WORDS) -> bool:
    piece = token.replace("</w>", "").replace("▁", "").strip()
    return bool(piece) and piece.lower() not in filler


def _positions(
    segment: TextSegment, caption: str, spans: list[tuple[int, int]], names: list[str], filler: frozenset[str] = DEFAULT_FILLER_WORDS
) -> list[list[int]]:
    tok = segment.tokenizer
    prefix, _, suffix = segment.template.partition("{}")
    spans = [(a + len(prefix), b + len(prefix)) for a, b in spans]
    if segment.lowercase and len(caption.lower()) == len(caption):  # same characters, so the spans still hold
        caption = caption.lower()
    enc = tok(prefix + caption + suffix, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    pieces = tok.convert_ids_to_tokens(ids)
    special = set(getattr(tok, "all_special_ids", []))
    out: list[list[int]] = []
    for (start, end), name in zip(spans, names):
        pos = [
            j
            for j, ((a, b), tid, piece) in enumerate(zip(offsets, ids, pieces))
            if tid not in special and b > a and a < end and b > start and _is_content_piece(piece, filler)
        ]
        if not pos:
            raise InvalidPromptError(f"class name {name!r} produced no content tokens with this model's tokenizer")
        pos = [j - segment.drop for j in pos]
        n_text = len(ids) - segment.drop  # tokens the denoiser sees
        if segment.pad_left and n_text <= segment.max_length:  # right-aligned: padding fills the first slots
            pos = [j + segment.max_length - n_text for j in pos]
        elif segment.pad_left or max(pos) >= segment.max_length - 1:  # the last slot holds the end token
            raise InvalidPromptError(
                f"class {name!r} falls past the tokenizer's {segment.max_length}-token limit (the caption has "
                f"{len(ids)} tokens); use fewer or shorter class names, or split them over several calls"
            )
        out.append([segment.offset + j for j in pos])
    return out


def _find_word(text: str, word: str, start: int) -> int:
    """Index of ``word`` as a whole word in ``text`` at or after ``start``, or -1."""
    match = re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)").search(text, start)
    return match.start() if match else -1


def _span(low: str, phrase: str, cursor: int, caption: str) -> tuple[int, int]:
    start = _find_word(low, phrase.lower(), cursor)
    if start < 0:
        start = _find_word(low, phrase.lower(), 0)
    if start < 0:
        raise InvalidPromptError(f"the caption {caption!r} does not contain the class name {phrase!r}")
    return start, start + len(phrase)


def build_layout(
    classes: Sequence[str],
    segments: Sequence[TextSegment],
    template: str = "a photo of {}",
    entities: Sequence[str] = (),
    caption: str | None = None,
    class_phrases: Sequence[Sequence[str]] | None = None,
    filler: frozenset[str] = DEFAULT_FILLER_WORDS,
) -> PromptLayout:
    """Build the caption (``template`` filled with "class1, class2, ..., entity1, ...") unless ``caption``
    is given (then every class must occur in it), and map classes/entities to token positions in every
    text segment of the model.

    ``class_phrases`` (with ``caption``): per class, the caption phrases whose tokens are the class's (as
    the published pipeline aligns caption entities such as "person, clothes" to a class); default: the
    class name. ``filler``: words never counted as content (:data:`FILLERS`)."""
    names = check_classes(classes)
    lowered = {n.lower() for n in names}
    extra = list(dict.fromkeys(e.strip() for e in entities if e and e.strip() and e.strip().lower() not in lowered))
    if caption is None:
        caption = template.format(", ".join(names + extra))
    phrases = [list(p) or [n] for p, n in zip(class_phrases, names)] if class_phrases is not None else [[n] for n in names]
    if len(phrases) != len(names):
        raise InvalidPromptError(f"{len(phrases)} class phrase lists for {len(names)} classes")
    groups = phrases + [[e] for e in extra]
    spans: list[tuple[int, int]] = []
    owner: list[int] = []
    low = caption.lower()
    cursor = 0
    for g, group in enumerate(groups):
        for phrase in group:
            spans.append(_span(low, phrase, cursor, caption))
            owner.append(g)
            cursor = max(cursor, spans[-1][1])
    labels = [p for group in groups for p in group]
    positions: list[list[int]] = [[] for _ in groups]
    for seg in segments:
        for g, pos in zip(owner, _positions(seg, caption, spans, labels, filler)):
            positions[g].extend(pos)
    positions = [sorted(set(p)) for p in positions]
    return PromptLayout(caption, names, positions[: len(names)], extra, positions[len(names) :])
