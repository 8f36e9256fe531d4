"""Captions as the published GOCA pipeline builds them from per-image noun lists (its ``captioner.py``).

Input: a noun list such as ``"Aeroplane, (person, clothes), mountains, sky."`` (the reference ships such
lists, written by GPT-4o, per dataset) and the classes to segment. Steps, as published:

1. drop a final ".", append ", background", lower-case;
2. split at the commas outside parentheses, drop repeats; a parenthesised group ("(person, clothes)": one
   object's parts) stays one phrase unless it names two or more of the classes, then only those class words
   are kept, each its own phrase;
3. every class that no phrase names is appended;
4. a phrase belongs to the first class one of its words names exactly (lower-case); the other phrases
   ("mountains", "sky", "background") are background entities, each its own map, max-merged into the
   supporting map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["published_caption", "split_phrases"]


@dataclass(frozen=True)
class PublishedCaption:
    """``caption``: the prompt; ``class_phrases[i]``: the phrases whose tokens are ``classes[i]``'s;
    ``entities``: the background entities."""

    caption: str
    class_phrases: list[list[str]]
    entities: list[str]


def split_phrases(text: str) -> list[str]:
    """Comma-separated phrases, commas inside parentheses kept: "a, (b, c), d" -> ["a", "(b, c)", "d"]."""
    out, depth, buf = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth <= 0:
            out.append(buf.strip())
            buf, depth = "", 0
        else:
            buf += ch
    out.append(buf.strip())
    return [p for p in out if p]


def _words(phrase: str) -> list[str]:
    return [w.strip() for w in phrase.replace("(", "").replace(")", "").split(",") if w.strip()]


def published_caption(nouns: str, classes: Sequence[str]) -> PublishedCaption:
    """The published caption for a noun list and the classes to segment (see the module docstring)."""
    text = nouns.strip()
    if text.endswith("."):
        text = text[:-1]
    text = (text + ", background").lower()
    lowered = [c.lower() for c in classes]

    def class_of(word: str) -> int | None:
        return lowered.index(word) if word in lowered else None

    phrases: list[str] = []
    for p in dict.fromkeys(split_phrases(text)):
        if p.startswith("("):
            hits = [w for w in _words(p) if class_of(w) is not None]
            phrases += hits if len(hits) >= 2 else [p]
        else:
            phrases.append(p)
    phrases = [", ".join(_words(p)) for p in dict.fromkeys(phrases)]
    owner = [next((class_of(w) for w in _words(p) if class_of(w) is not None), None) for p in phrases]
    for i, c in enumerate(lowered):
        if i not in owner:
            phrases.append(c)
            owner.append(i)
    class_phrases = [[p for p, o in zip(phrases, owner) if o == i] for i in range(len(classes))]
    entities = [p for p, o in zip(phrases, owner) if o is None]
    return PublishedCaption(", ".join(phrases), class_phrases, entities)
