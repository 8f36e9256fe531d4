"""Where each image's prompt comes from: the classes it names and, optionally, its caption.

A label source is named by a spec string (it goes into run manifests and reports as is):

* ``oracle`` — the classes present in the image's ground truth ("oracle image labels", as the papers);
* ``all`` — every dataset class in every prompt (open vocabulary);
* ``labels=FILE.json`` — a per-image label file ``{image file name or id: [class, ...]}`` (the GOCA
  reference ships predicted labels in such files); an empty list means the image names no class;
* ``captions=FILE.json`` — per-image noun lists ``{image: "noun, (noun, noun), ..." | [nouns] |
  {"caption": ...}}`` turned into captions as the published pipeline does
  (:func:`difffeat.segment.captions.published_caption`): nouns that are not classes become background
  entities. The classes come from the oracle labels (as published) unless the spec adds ``;labels=FILE``
  (or ``;all``).

Every file is read and checked against the dataset before the run (:meth:`LabelSource.check`): a missing
image, an unknown class or a malformed entry is a :class:`~difffeat.errors.LabelFileError` naming the file
and the entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import LabelFileError, close_matches
from ..segment.captions import published_caption

__all__ = ["item_keys", "source_spec", "ImageFiles"]


@dataclass(frozen=True)
class ImagePrompt:
    """One image's prompt: the dataset ``labels`` it names (1-based, in prompt order) and, for captions,
    the ``caption``, the ``class_phrases`` of each named class and the background ``entities``."""

    labels: list[int]
    caption: str | None = None
    class_phrases: list[list[str]] | None = None
    entities: list[str] = field(default_factory=list)


def item_keys(dataset: Any, i: int) -> list[str]:
    """The names a label file may use for item ``i`` (file name, stem, id), cheaply when the dataset can."""
    if hasattr(dataset, "item_keys"):
        return list(dataset.item_keys(i))
    name = dataset[i].name
    return list(dict.fromkeys([name, Path(name).stem]))


class LabelSource:
    """Base: ``spec`` (what the report states), ``description``, :meth:`check` and :meth:`prompt`."""

    spec = ""
    description = ""

    def check(self, dataset: Any, n: int | None = None) -> None:
        """Raise before the run if the first ``n`` images of ``dataset`` cannot be prompted."""

    def prompt(self, item: Any, classes: Sequence[str]) -> ImagePrompt:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec


class OracleLabels(LabelSource):
    spec = "oracle"
    description = "oracle image labels (prompt names the classes present in the ground truth; as in the papers)"

    def prompt(self, item: Any, classes: Sequence[str]) -> ImagePrompt:
        if getattr(item, "gt", None) is None:
            raise LabelFileError("oracle labels need ground truth; name the classes, or give a label file")
        return ImagePrompt(item.present())


class AllClasses(LabelSource):
    spec = "all"
    description = "all dataset classes (open-vocabulary: every prompt names every class)"

    def prompt(self, item: Any, classes: Sequence[str]) -> ImagePrompt:
        return ImagePrompt(list(range(1, len(classes) + 1)))


def _read_json(path: Path, kind: str) -> dict:
    if path.is_dir():
        raise LabelFileError(f"{kind} file {str(path)!r} is a folder; give the JSON file itself, e.g. {str(path / (kind + 's.json'))!r}")
    if not path.is_file():
        raise LabelFileError(f"{kind} file {str(path)!r} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{kind} file {str(path)!r} is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise LabelFileError(f"{kind} file {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(data, dict):
        raise LabelFileError(f"{kind} file {str(path)!r} must hold a JSON object {{image file name or id: ...}}, not a {type(data).__name__}")
    return data


class _PerImageFile(LabelSource):
    """Shared: entries keyed by image file name, stem or id, matched to dataset items in :meth:`check`."""

    kind = "label"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries = {str(k): self._entry(str(k), v) for k, v in _read_json(self.path, self.kind).items()}
        self._by_name: dict[str, str] = {}

    def _entry(self, key: str, value: Any) -> Any:
        raise NotImplementedError

    def _error(self, key: str, problem: str) -> LabelFileError:
        return LabelFileError(f"{self.kind} file {str(self.path)!r}, entry {key!r}: {problem}")

    def _key_for(self, keys: Sequence[str]) -> str | None:
        return next((k for k in keys if k in self.entries), None)

    def check(self, dataset: Any, n: int | None = None) -> None:
        n = len(dataset) if n is None else min(n, len(dataset))
        missing = []
        for i in range(n):
            keys = item_keys(dataset, i)
            key = self._key_for(keys)
            if key is None:
                missing.append(keys[0])
            else:
                self._by_name[keys[0]] = key
        if missing:
            raise LabelFileError(
                f"{self.kind} file {str(self.path)!r} has no entry for image {missing[0]!r}"
                + (f" nor for {len(missing) - 1} other image(s)" if len(missing) > 1 else "")
                + " of the dataset; add one per image (keyed by file name, stem or id; [] = no class)"
            )
        self._check_classes(list(dataset.classes))

    def _check_classes(self, classes: list[str]) -> None:
        pass

    def entry_for(self, item: Any) -> tuple[str, Any]:
        keys = [self._by_name.get(item.name), item.name, Path(item.name).stem]
        key = self._key_for([k for k in keys if k])
        if key is None:
            raise LabelFileError(f"{self.kind} file {str(self.path)!r} has no entry for image {item.name!r}")
        return key, self.entries[key]


class LabelFile(_PerImageFile):
    """Per-image class lists ``{image: [class, ...]}``."""

    kind = "label"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.spec = f"labels={self.path}"
        self.description = f"per-image label file {self.path} (prompt names the classes the file lists for the image)"

    def _entry(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise self._error(key, f"must be a list of class names, got {json.dumps(value)[:80]}")
        return value

    def _check_classes(self, classes: list[str]) -> None:
        lowered = [c.lower() for c in classes]
        for key, names in self.entries.items():
            for name in names:
                if name.lower() not in lowered:
                    hint = close_matches(name, classes, 3)
                    raise self._error(key, f"names {name!r}, which is not a class of this dataset"
                                      + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else "")
                                      + f"; its classes: {', '.join(classes)}")  # fmt: skip

    def prompt(self, item: Any, classes: Sequence[str]) -> ImagePrompt:
        key, names = self.entry_for(item)
        lowered = [c.lower() for c in classes]
        try:
            labels = [lowered.index(n.lower()) + 1 for n in names]
        except ValueError:
            self._check_classes(list(classes))
            raise
        return ImagePrompt(list(dict.fromkeys(labels)))


class CaptionFile(_PerImageFile):
    """Per-image noun lists turned into published-style captions; classes from ``classes_from``."""

    kind = "caption"

    def __init__(self, path: str | Path, classes_from: LabelSource | None = None) -> None:
        super().__init__(path)
        self.classes_from = classes_from or OracleLabels()
        self.spec = f"captions={self.path};{self.classes_from.spec}"
        self.description = (f"per-image captions from {self.path}, built as the published pipeline (nouns that are not "
                            f"classes are background entities); classes: {self.classes_from.description}")  # fmt: skip

    def _entry(self, key: str, value: Any) -> str:
        if isinstance(value, dict) and isinstance(value.get("caption"), str):
            value = value["caption"]
        elif isinstance(value, list) and all(isinstance(w, str) for w in value):
            value = ", ".join(value)
        if not isinstance(value, str) or not value.strip():
            raise self._error(key, f'must be a noun list ("cat, (person, clothes), grass"), a list of nouns or {{"caption": ...}}, got {json.dumps(value)[:80]}')
        return value

    def check(self, dataset: Any, n: int | None = None) -> None:
        self.classes_from.check(dataset, n)
        super().check(dataset, n)

    def prompt(self, item: Any, classes: Sequence[str]) -> ImagePrompt:
        labels = self.classes_from.prompt(item, classes).labels
        _, nouns = self.entry_for(item)
        plan = published_caption(nouns, [classes[l - 1] for l in labels])
        return ImagePrompt(labels, plan.caption, plan.class_phrases, plan.entities)


@lru_cache(maxsize=16)
def label_source(spec: str) -> LabelSource:
    """The source a spec names (see the module docstring); files are read once per spec."""
    if isinstance(spec, LabelSource):
        return spec
    parts = [p.strip() for p in str(spec).split(";") if p.strip()]
    simple = {"oracle": OracleLabels, "all": AllClasses}
    if len(parts) == 1 and parts[0] in simple:
        return simple[parts[0]]()
    kinds = dict(p.split("=", 1) if "=" in p else (p, "") for p in parts)
    if "benchmark" in kinds and "captions" in kinds:  # a --dataset run's published captions
        from .benchmarks.captions import parse_spec

        return parse_spec(kinds)
    if "captions" in kinds and len(parts) <= 2:
        rest = [p for p in parts if not p.startswith("captions=")]
        return CaptionFile(kinds["captions"], label_source(rest[0]) if rest else None)
    if set(kinds) == {"labels"}:
        return LabelFile(kinds["labels"])
    raise LabelFileError(f"unknown label source {spec!r}; use oracle, all, labels=FILE.json, captions=FILE.json or "
                         "captions=FILE.json;labels=FILE.json")  # fmt: skip


def source_spec(setting: str = "oracle", label_file: str | Path | None = None, caption_file: str | Path | None = None) -> str:
    """The spec of a label source from the CLI's options: ``label_file`` replaces ``setting`` as the class
    source; ``caption_file`` adds published-style captions on top of it."""
    base = f"labels={label_file}" if label_file else setting
    return f"captions={caption_file};{base}" if caption_file else base


class ImageFiles:
    """Image files without ground truth, as a dataset of the given ``classes`` (for ``segment`` with a
    label or caption file: entries are keyed by file name or stem)."""

    def __init__(self, paths: Sequence[str | Path], classes: Sequence[str]) -> None:
        self.paths, self.classes = [Path(p) for p in paths], list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def item_keys(self, i: int) -> list[str]:
        return [self.paths[i].name, self.paths[i].stem]

    def __getitem__(self, i: int):
        from .datasets import EvalItem

        return EvalItem(self.paths[i].name, self.paths[i], None)
