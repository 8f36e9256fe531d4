"""Class words checked against what the model knows.

A model with a *closed vocabulary* (trained on a fixed word list, like the embedded ``shapes`` model) says
so with a ``vocabulary.json`` next to its ``model_index.json``::

    {"classes": ["circle", "square", ...], "words": ["a", "blue", "circle", "circles", ...]}

``classes`` are the words it can segment; ``words`` every word its captions used. For such a model a class
is normalised to its class word (case, plural: ``"Circles"`` -> ``"circle"``) and any other word gets a
warning naming the closest class. For an open-vocabulary model a class is lower-cased only where the
tokenizer would otherwise split it into more pieces (a case-sensitive tokenizer), and a name whose tokens
include the tokenizer's unknown token gets a warning.

    check = check_class_words(["Circles", "banana"], backbone)
    check.names     # ["circle", "banana"]
    check.warnings  # ["'banana' is not a word the model knows ...; its classes are circle, square, ..."]
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidPromptError, close_matches
from .prompts import FILLER_WORDS, check_classes


#: the file in a model folder that declares a closed vocabulary
VOCABULARY_FILE = "vocabulary.json"


class ClassVocabularyWarning(UserWarning):
    """A class name that the model does not know (or knows only as a word, not as a class)."""


@dataclass(frozen=True)
class Vocabulary:
    """A closed vocabulary: the class words a model can segment and every word it was trained on."""

    classes: tuple[str, ...]
    words: frozenset[str]

    @classmethod
    def read(cls, path: str | Path) -> "Vocabulary":
        raw = json.loads(Path(path).read_text())
        classes = tuple(str(c).lower() for c in raw["classes"])
        return cls(classes, frozenset(str(w).lower() for w in raw.get("words", ())) | frozenset(classes))

    def class_word(self, word: str) -> str | None:
        """The class ``word`` names, through case and English plural (``"Crosses"`` -> ``"cross"``), or None."""
        low = word.lower()
        return next((c for c in (low, *_singulars(low)) if c in self.classes), None)


def _singulars(word: str) -> list[str]:
    """Candidate singulars of an English plural (``"boxes"`` -> ``["boxe", "box"]``)."""
    out = []
    if word.endswith("ies") and len(word) > 3:
        out.append(word[:-3] + "y")
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


def model_vocabulary(backbone: Any) -> Vocabulary | None:
    """The closed vocabulary the model's folder declares (:data:`VOCABULARY_FILE`), or None (open vocabulary)."""
    folder = getattr(getattr(backbone, "pipeline", None), "name_or_path", None)
    if not folder:
        return None
    path = Path(str(folder)) / VOCABULARY_FILE
    return Vocabulary.read(path) if path.is_file() else None


@dataclass
class ClassCheck:
    """Class names as the model will see them.

    Attributes:
        names: the names to segment with, in the given order (normalised where that helps the tokenizer).
        renamed: ``{given: used}`` for every name that was normalised.
        unknown: given names with a word the model does not know.
        warnings: one readable sentence per problem (also issued as :class:`ClassVocabularyWarning`).
        known: the closed vocabulary's class words (empty for an open-vocabulary model).
        dropped: the unknown names left out of :attr:`names` (``drop_unknown=True`` only).
    """

    names: list[str]
    renamed: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    known: tuple[str, ...] = ()
    dropped: list[str] = field(default_factory=list)


def _token_count(backbone: Any, text: str) -> int:
    return sum(len(seg.tokenizer.tokenize(text)) for seg in backbone.text_segments())


def _has_unknown_token(backbone: Any, text: str) -> bool:
    for seg in backbone.text_segments():
        tok = seg.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None and unk in tok(text, add_special_tokens=False)["input_ids"]:
            return True
    return False


def _closed(names: list[str], vocab: Vocabulary, check: ClassCheck) -> None:
    listing = ", ".join(vocab.classes)
    for name in names:
        words = re.findall(r"\w+", name)
        mapped = [vocab.class_word(w) for w in words]
        if len(words) == 1 and mapped[0]:
            used = mapped[0]
        else:  # several words ("red circles"): each lower-cased, a plural class word made singular
            used = " ".join(m or w.lower() for w, m in zip(words, mapped))
        if used != name:
            check.renamed[name] = used
        check.names.append(used)
        strangers = [w for w, m in zip(words, mapped) if not m and w.lower() not in vocab.words]
        if strangers:
            check.unknown.append(name)
            hint = close_matches(strangers[0].lower(), vocab.classes, n=3)
            check.warnings.append(
                f"{strangers[0]!r}{'' if strangers[0] == name else f' (in class {name!r})'} is not a word this model knows, so its attention map is "
                f"noise" + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else ".")
                + f" The model's classes are: {listing}."
            )
        elif not any(mapped):
            check.unknown.append(name)
            check.warnings.append(
                f"{name!r} is a word this model knows but not one of its classes ({listing}); it was never "
                "taught to localise it"
            )


def _open(names: list[str], backbone: Any, check: ClassCheck) -> None:
    for name in names:
        used = name.lower() if _token_count(backbone, name.lower()) < _token_count(backbone, name) else name
        if used != name:
            check.renamed[name] = used
        check.names.append(used)
        if _has_unknown_token(backbone, used):
            check.unknown.append(name)
            check.warnings.append(f"class {name!r} contains characters this model's tokenizer does not know (unknown tokens)")


def _drop_unknown(given: list[str], check: ClassCheck) -> None:
    """Remove ``check.unknown`` from ``check.names`` (aligned with ``given``) and say so in each warning."""
    check.dropped = list(check.unknown)
    check.names = [used for name, used in zip(given, check.names) if name not in check.unknown]
    check.warnings = [f"left out: {w}" for w in check.warnings]
    if not check.names:
        known = f" This model's classes are: {', '.join(check.known)}." if check.known else ""
        raise InvalidPromptError(
            f"no class left to segment: {', '.join(map(repr, check.dropped))} "
            f"{'is not a word' if len(check.dropped) == 1 else 'are not words'} this model can segment; "
            f"name at least one class it knows.{known}"
        )


def check_class_words(classes: Sequence[str] | str, backbone: Any, *, drop_unknown: bool = False) -> ClassCheck:
    """Validate ``classes`` (:func:`~difffeat.segment.prompts.check_classes`) and check them against what
    ``backbone`` knows. Raises :class:`InvalidPromptError` for an empty list (naming this model's classes when
    it has a closed vocabulary) or for names that become duplicates once normalised; unknown words are
    warnings (in :attr:`ClassCheck.warnings`), never errors.

    ``drop_unknown=True`` leaves the unknown names out of :attr:`ClassCheck.names` (listed in
    :attr:`ClassCheck.dropped`, each warning saying so): an unknown word's attention map is noise that takes
    pixels from the known classes (on the shapes example 0001, adding "banana" to square, ring, diamond drops
    the diamond's IoU from 0.886 to 0.114: ``benchmarks/unknown_word_shapes.py``). Raises
    :class:`InvalidPromptError` when no name is left."""
    vocab = model_vocabulary(backbone)
    given = classes.split(",") if isinstance(classes, str) else list(classes)
    if not any(str(c).strip() for c in given):
        example = ", ".join(vocab.classes[:2]) if vocab else "cat, dog"
        known = f" This model knows: {', '.join(vocab.classes)}." if vocab else ""
        raise InvalidPromptError(f"empty class list: name at least one class, e.g. \"{example}\".{known}")
    names = check_classes(given)
    check = ClassCheck([], known=vocab.classes if vocab else ())
    _closed(names, vocab, check) if vocab else _open(names, backbone, check)
    if drop_unknown and check.unknown:
        _drop_unknown(names, check)
    lowered = [n.lower() for n in check.names]
    dupes = sorted({n for n in lowered if lowered.count(n) > 1})
    if dupes:
        raise InvalidPromptError(
            f"class names {[n for n in names if check.renamed.get(n, n).lower() in dupes]} all mean {dupes}; name each class once"
        )
    return check


def class_words(classes: Sequence[str] | str, backbone: Any) -> list[str]:
    """:attr:`ClassCheck.names` of :func:`check_class_words`, each of its warnings issued as a
    :class:`ClassVocabularyWarning` (what :class:`~difffeat.Segmenter` uses)."""
    check = check_class_words(classes, backbone)
    for message in check.warnings:
        warnings.warn(message, ClassVocabularyWarning, stacklevel=3)
    return check.names


def prompt_class_words(prompt: str, backbone: Any) -> list[str]:
    """The default class words of ``prompt`` (``difffeat generate`` without ``--classes``, the demo's Generate
    tab with a blank class box, :func:`difffeat.trace` without classes; the one place they are decided): the
    words ``backbone`` can segment, in prompt order, as written. For a model with a closed vocabulary (the
    embedded ``shapes`` model) the first word naming each of its classes ("circles" names "circle"; colours and
    "background" name none), else every word but the fillers ("a", "and", "on", ...), each once."""
    words = list(dict.fromkeys(re.findall(r"[a-z0-9]+", prompt.lower())))
    vocab = model_vocabulary(backbone)
    if vocab is None:
        return [w for w in words if w not in FILLER_WORDS]
    named: dict[str, str] = {}  # class -> the prompt's first word naming it
    for w in words:
        c = vocab.class_word(w)
        if c is not None:
            named.setdefault(c, w)
    return list(named.values())
