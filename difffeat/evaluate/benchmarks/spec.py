"""The six GOCA benchmarks as data: ``configs/datasets/<name>.json`` (class names, caption synonyms, id
maps, split rule, official layout and download page), read into :class:`BenchmarkSpec`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ...errors import InvalidOptionError, close_matches
from ...resources import data_dir


#: every benchmark ``--dataset`` accepts, in the order of the paper's table
BENCHMARKS = ("voc", "context", "coco-object", "coco-stuff", "cityscapes", "ade20k")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark protocol as published (see ``configs/datasets/<name>.json``).

    Attributes:
        name: the ``--dataset`` name.
        title, download, archive: what it is and where its official download lives.
        layout: the paths (relative to ``--root``) the official archives unpack to.
        split: the images evaluated, in which order.
        void: what void / unlisted label ids count as.
        classes: class names 1..K (label 0 is background).
        synonyms: per class 1..K, the caption words that name it (the first is the word appended for a
            missing class), as the published captioner matches them.
        append_background / append_missing_class: the published caption switches of this benchmark.
        caption_classes_from: where the captioner's ground-truth classes come from.
        caption_key: how the published noun lists key an image.
        labels: the id map (its ``kind`` says how a label file is read).
    """

    name: str
    title: str
    download: str
    archive: str
    layout: tuple[str, ...]
    split: str
    void: str
    classes: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    append_background: bool
    append_missing_class: bool
    caption_classes_from: str
    caption_key: str
    labels: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What ``difffeat datasets`` prints."""
        return {"name": self.name, "title": self.title, "download": self.download, "archive": self.archive,
                "layout": list(self.layout), "split": self.split, "void": self.void, "classes": len(self.classes),
                "caption": {"append_background": self.append_background,
                            "append_missing_class": self.append_missing_class}}  # fmt: skip


def benchmark_names() -> list[str]:
    return list(BENCHMARKS)


@lru_cache(maxsize=None)
def benchmark_spec(name: str) -> BenchmarkSpec:
    """The spec of benchmark ``name`` (one of :data:`BENCHMARKS`)."""
    if name not in BENCHMARKS:
        hint = close_matches(str(name), BENCHMARKS, 2)
        raise InvalidOptionError(f"unknown --dataset {name!r}" + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else "")
                                 + f"; choose one of {', '.join(BENCHMARKS)} (`difffeat datasets` lists them)")  # fmt: skip
    d = json.loads((data_dir("configs") / "datasets" / f"{name}.json").read_text(encoding="utf-8"))
    cap = d["caption"]
    return BenchmarkSpec(
        name=d["name"], title=d["title"], download=d["download"], archive=d["archive"], layout=tuple(d["layout"]),
        split=d["split"], void=d["void"], classes=tuple(d["classes"]), synonyms=tuple(tuple(s) for s in d["synonyms"]),
        append_background=bool(cap["append_background"]), append_missing_class=bool(cap["append_missing_class"]),
        caption_classes_from=cap["classes_from"], caption_key=cap["key"], labels=d["labels"],
    )
