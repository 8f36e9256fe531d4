"""Benchmark captions as the published GOCA captioner builds them (its ``captioner.py`` with the dataset's
synonym lists and switches), and the label source that prompts a benchmark run with them.

Rules, for one image's GPT noun list (e.g. ``"Aeroplane, (person, clothes), mountains, sky."``), the
benchmark's synonym lists and the classes the ground truth holds (``present``):

1. drop one final "."; append ", background" if the benchmark's ``append_background`` is on; lower-case;
2. split at the commas outside parentheses (as the published regex + buffer does: a group "(a, b)" is one
   phrase), drop repeats;
3. a word names class c when it is one of c's synonyms and c is present; the first such class in class
   order wins. A group naming two or more classes is replaced by those words, each its own phrase; repeats
   dropped again; parentheses removed;
4. ``append_missing_class``: every present class no phrase names is appended as its first synonym, in the
   order the published code iterates the set of missing classes;
5. each phrase belongs to the class its first naming word names; the classes named form the prompt, in
   phrase order; the other phrases are background entities.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import LabelFileError
from ..label_sources import CaptionFile, ImagePrompt
from .spec import BenchmarkSpec, benchmark_spec


_PIECES = re.compile(r"\([^)]*\)|[^,]+")


def split_noun_list(text: str) -> list[str]:
    """Phrases of a noun list, split at commas outside parentheses, each stripped (the published split:
    pieces between commas are re-joined with ", " from a piece holding "(" to the next holding ")")."""
    out: list[str] = []
    group: str | None = None
    for piece in _PIECES.findall(text):
        p = piece.strip()
        if piece.startswith("(") and piece.endswith(")"):
            out.append(p)
        elif "(" in piece:
            group = p
        elif ")" in piece:
            out.append(f"{group or ''}, {p}")
            group = None
        elif group:
            group = f"{group}, {p}"
        else:
            out.append(p)
    return out


@dataclass(frozen=True)
class BenchmarkCaption:
    """``caption``; ``labels``: the classes it names (1-based, in phrase order); ``class_phrases[i]``: the
    phrases of ``labels[i]``; ``entities``: the background phrases."""

    caption: str
    labels: list[int]
    class_phrases: list[list[str]]
    entities: list[str]


def benchmark_caption(nouns: str, synonyms: Sequence[Sequence[str]], present: Sequence[int],
                      append_background: bool, append_missing_class: bool) -> BenchmarkCaption:
    """The published caption of one image (module docstring); ``synonyms[c - 1]`` lists class c's words,
    ``present`` the ground-truth classes in the published iteration order."""
    present_set = set(present)

    def class_of(word: str) -> int | None:
        return next((c for c in range(1, len(synonyms) + 1) if c in present_set and word in synonyms[c - 1]), None)

    def words(phrase: str, group: bool) -> list[str]:
        return phrase.split(", ") if group else [phrase]

    text = nouns[:-1] if nouns.endswith(".") else nouns
    text = (text + ", background" if append_background else text).lower()
    phrases: list[str] = []
    for p in dict.fromkeys(split_noun_list(text)):
        if "(" not in p:
            phrases.append(p)
            continue
        parts = p.replace("(", "").replace(")", "").split(", ")
        named = [w for w in parts if class_of(w) is not None]
        phrases += named if len(named) >= 2 else [p]
    plain = [(p.replace("(", "").replace(")", ""), "(" in p) for p in dict.fromkeys(phrases)]

    def owner(phrase: str, group: bool) -> int | None:
        return next((c for c in map(class_of, words(phrase, group)) if c is not None), None)

    if append_missing_class:
        named_classes = {owner(p, g) for p, g in plain} - {None}
        for c in set(list(present)) - named_classes:  # the published set iteration order
            plain.append((synonyms[c - 1][0], False))
    labels: dict[int, list[str]] = {}
    entities: list[str] = []
    for p, g in plain:
        c = owner(p, g)
        if c is None:
            entities.append(p)
        else:
            labels.setdefault(c, []).append(p)
    return BenchmarkCaption(", ".join(p for p, _ in plain), list(labels), list(labels.values()), entities)


def caption_rules(spec: BenchmarkSpec, append_background: bool | None = None, append_missing_class: bool | None = None) -> dict[str, Any]:
    """The caption switches of a run: the benchmark's published values unless overridden."""
    return {"append_background": spec.append_background if append_background is None else bool(append_background),
            "append_missing_class": spec.append_missing_class if append_missing_class is None else bool(append_missing_class),
            "synonyms": f"configs/datasets/{spec.name}.json"}  # fmt: skip


#: how each benchmark's images are named (the keys of its published noun lists)
_KEY_PATTERNS = {
    "voc or context": r"^\d{4}_\d{6}\.jpg$",
    "coco-object or coco-stuff": r"^\d{12}\.jpg$",
    "cityscapes": r"_leftImg8bit\.png$",
    "ade20k": r"^ADE_val_\d{8}\.jpg$",
}


class BenchmarkCaptions(CaptionFile):
    """Per-image GPT noun lists (the published ``gpt_output/<dataset>.json`` from the user's copy of the
    reference repository) made into the benchmark's published captions (:func:`benchmark_caption`)."""

    def __init__(self, path: str | Path, dataset: str, append_background: bool | None = None,
                 append_missing_class: bool | None = None) -> None:
        super().__init__(path)
        self.benchmark = benchmark_spec(dataset)
        rules = caption_rules(self.benchmark, append_background, append_missing_class)
        self.append_background, self.append_missing_class = rules["append_background"], rules["append_missing_class"]
        self.spec = (f"captions={self.path};benchmark={dataset};background={int(self.append_background)};"
                     f"missing={int(self.append_missing_class)}")  # fmt: skip
        self.description = (f"per-image noun lists from {self.path} made into {dataset}'s published captions "
                            f"(synonyms of configs/datasets/{dataset}.json, append background "
                            f"{'on' if self.append_background else 'off'}, append missing classes "
                            f"{'on' if self.append_missing_class else 'off'}; classes matched against the ground truth)")  # fmt: skip

    def check(self, dataset: Any, n: int | None = None) -> None:
        n = len(dataset) if n is None else min(n, len(dataset))
        names = {k for i in range(n) for k in dataset.item_keys(i)}
        if n and not names & set(self.entries):
            sample = next(iter(self.entries), "")
            looks = next((d for d, pat in _KEY_PATTERNS.items() if re.search(pat, sample)), None)
            raise LabelFileError(f"caption file {str(self.path)!r} names none of {self.benchmark.name}'s images (e.g. it has "
                                 f"{sample!r}, the dataset {dataset.item_keys(0)[0]!r})"
                                 + (f": it looks like a {looks} noun list" if looks else "")
                                 + f"; pass the reference repository's gpt_output/{self._published_file()}")  # fmt: skip
        super().check(dataset, n)

    def _published_file(self) -> str:
        return {"cityscapes": "city.json", "ade20k": "ade.json"}.get(self.benchmark.name, f"{self.benchmark.name}.json")

    def prompt(self, item: Any, classes: Sequence[str]) -> ImagePrompt:
        present = getattr(item, "caption_classes", None)
        if present is None:
            raise LabelFileError(f"{self.benchmark.name} captions need a benchmark item (open the dataset with --dataset)")
        _, nouns = self.entry_for(item)
        cap = benchmark_caption(nouns, self.benchmark.synonyms, present, self.append_background, self.append_missing_class)
        return ImagePrompt(cap.labels, cap.caption, cap.class_phrases, cap.entities)


def parse_spec(parts: dict[str, str]) -> BenchmarkCaptions:
    """The source a ``captions=FILE;benchmark=NAME;background=0|1;missing=0|1`` spec names."""
    try:
        flags = {k: bool(int(parts[k])) if k in parts else None for k in ("background", "missing")}
    except ValueError:
        raise LabelFileError(f"background= and missing= take 0 or 1, got {json.dumps(parts)}") from None
    return BenchmarkCaptions(parts["captions"], parts["benchmark"], flags["background"], flags["missing"])
