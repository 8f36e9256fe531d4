"""Caption vocabulary and prompt variants for the shapes world.

Training uses a mix of the full descriptive caption and short list-style prompts (with or without colours,
random object order), so the model understands both ``"a red circle and a blue star on a striped green
background"`` and the segmenter's ``"a photo of circle, star"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from difffeat.shapes.world import BACKGROUND_WORDS, COLOURS, SHAPE_CLASSES, describe

__all__ = ["vocabulary", "vocabulary_file", "plural", "random_prompt", "list_prompt"]

PROMPT_PREFIXES: tuple[str, ...] = ("a photo of", "a picture of", "an image of")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
COMMON_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "on", "of", "with", "in", "is", "are", "there", "some", "to",
    "photo", "picture", "image", "scene", "background", "object", "objects", "shape", "shapes",
    "flat", "plain", "stripes", "noise", "textured", ",", ".",
)  # fmt: skip


def plural(word: str) -> str:
    """English plural of a class name (``"cross"`` -> ``"crosses"``)."""
    return word + "es" if word.endswith("s") else word + "s"


def vocabulary() -> list[str]:
    """Every word the shapes model's tokenizer keeps as a single token."""
    words = set(SHAPE_CLASSES) | {plural(c) for c in SHAPE_CLASSES} | set(COLOURS)
    words |= {w for w in BACKGROUND_WORDS.values() if w} | set(NUMBER_WORDS) | set(COMMON_WORDS)
    return sorted(words)


def vocabulary_file() -> dict:
    """The exported model's ``vocabulary.json`` (read by :func:`difffeat.segment.vocabulary.model_vocabulary`):
    the class words it segments and every word of its captions."""
    return {
        "description": "closed vocabulary of the shapes model (difffeat/shapes/captions.py): classes = the words "
        "it segments, words = every word of its captions",
        "classes": list(SHAPE_CLASSES),
        "words": [w for w in vocabulary() if w.isalpha()],
    }


def _join(parts: Sequence[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    if rng.random() < 0.5:
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return ", ".join(parts)


def list_prompt(class_names: Sequence[str], prefix: str = "a photo of") -> str:
    """The segmenter-style prompt: ``"a photo of circle, star"``."""
    body = ", ".join(class_names)
    return f"{prefix} {body}" if prefix else body


def random_prompt(
    objects: Sequence[tuple[str, str]],
    background: str,
    background_colour: str,
    rng: np.random.Generator,
    p_empty: float = 0.1,
) -> str:
    """A random training caption for a scene.

    Args:
        objects: ``(class_name, colour)`` per visible object, in painting order.
        background, background_colour: the scene's background kind and colour word.
        rng: source of randomness (the caller seeds it per step for reproducible runs).
        p_empty: probability of the empty caption (classifier-free guidance dropout).
    """
    u = rng.random()
    if u < p_empty or not objects:
        return ""
    objs = list(objects)
    order = rng.permutation(len(objs))
    shuffled = [objs[i] for i in order]
    unique_classes = list(dict.fromkeys(c for c, _ in shuffled))
    style = int(rng.integers(8))
    if style <= 1:  # full description, original or shuffled order
        return describe(objs if style == 0 else shuffled, background, background_colour)
    if style == 2:  # "circle, star"
        return ", ".join(unique_classes)
    if style == 3:  # "a photo of circle, star"
        return list_prompt(unique_classes, PROMPT_PREFIXES[int(rng.integers(len(PROMPT_PREFIXES)))])
    if style == 4:  # "a photo of a circle and a star"
        prefix = PROMPT_PREFIXES[int(rng.integers(len(PROMPT_PREFIXES)))]
        return f"{prefix} " + _join([f"a {c}" if c[0] not in "aeiou" else f"an {c}" for c in unique_classes], rng)
    if style == 5:  # "a circle and star on background" / "... on a green background"
        body = _join(unique_classes, rng)
        if rng.random() < 0.5:
            return f"a {body} on background"
        adj = BACKGROUND_WORDS[background]
        bg = f"{adj} {background_colour}" if adj else background_colour
        return f"a {body} on a {bg} background"
    if style == 6:  # "red circle, blue star"
        return _join([f"{col} {c}" for c, col in shuffled], rng)
    # "a photo of a red circle and a blue star"
    prefix = PROMPT_PREFIXES[int(rng.integers(len(PROMPT_PREFIXES)))]
    return f"{prefix} " + _join([f"{'an' if col[0] in 'aeiou' else 'a'} {col} {c}" for c, col in shuffled], rng)
