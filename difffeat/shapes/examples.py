"""Write the bundled example images (held-out ``test`` split) to ``difffeat/examples/``.

Run as ``python -m difffeat.shapes.examples --out difffeat/examples``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from PIL import Image

from difffeat.resources import package_dir
from difffeat.shapes.world import sample

__all__ = ["write_examples", "read_examples", "KNOWN_FAILURES"]

#: Test-split scenes chosen for variety (1-4 objects, all background kinds).
DEFAULT_INDICES: tuple[int, ...] = (1, 3, 4, 6, 9, 11)

#: Bundled examples the shipped shapes model gets wrong, and how (``python benchmarks/examples_shapes.py``,
#: benchmarks/results/examples_shapes.json); :func:`read_examples` adds them as ``known_failure``.
KNOWN_FAILURES: dict[str, str] = {
    "shapes_test_0009.png": "the shapes model swaps the square and the star (IoU 0 for both) in this crowded four-object scene",
}


def write_examples(out: str | Path, indices: tuple[int, ...] = DEFAULT_INDICES, split: str = "test") -> list[dict]:
    """Save ``shapes_<split>_<index>.png`` (+ ``..._mask.png``, class ids) and ``examples.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in indices:
        s = sample(split, index)
        name = f"shapes_{split}_{index:04d}"
        s.image.save(out / f"{name}.png")
        Image.fromarray(s.mask, "L").save(out / f"{name}_mask.png")
        entries.append({"file": f"{name}.png", "mask": f"{name}_mask.png", "caption": s.caption,
                        "classes_present": list(s.classes_present), "split": split, "index": index})  # fmt: skip
    tmp = out / "examples.json.tmp"
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    os.replace(tmp, out / "examples.json")
    return entries


def read_examples(folder: str | Path | None = None) -> list[dict]:
    """The entries of ``examples.json`` in ``folder`` (default: the examples shipped in the package), each with
    ``path`` and ``mask_path`` added: the full paths of its image and its mask, and ``known_failure``: how the
    shapes model fails on it (:data:`KNOWN_FAILURES`), or None."""
    folder = Path(folder) if folder is not None else package_dir() / "examples"
    entries = json.loads((folder / "examples.json").read_text())
    return [{**e, "path": folder / e["file"], "mask_path": folder / e["mask"], "known_failure": KNOWN_FAILURES.get(e["file"])}
            for e in entries]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="difffeat/examples")
    p.add_argument("--indices", type=int, nargs="*", default=list(DEFAULT_INDICES))
    args = p.parse_args(argv)
    for e in write_examples(args.out, tuple(args.indices)):
        print(e["file"], "-", e["caption"])


if __name__ == "__main__":
    main()
