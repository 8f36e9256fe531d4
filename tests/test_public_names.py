"""Public names: each is exported (listed in an ``__all__``) from exactly one path.

The package facade ``difffeat`` is the canonical path of the names in its ``__all__``; a subpackage's
``__init__`` the canonical path of the rest of its public names; the modules inside a subpackage list only
what their package does not. Other import paths keep working (``difffeat.segment.Segmenter``), unadvertised.
"""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "difffeat"
#: still listing observer names twice while the layout refactor of issue 30 rewrites capture/
PENDING = {"difffeat.capture", "difffeat.capture.observer", "difffeat.capture.probe", "difffeat.capture.session"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exports() -> dict[str, list[str]]:
    """public name -> the modules whose ``__all__`` lists it (the facade's and ``difffeat.runs``' read at run time)."""
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        module = _module(path)
        if module in PENDING:
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                try:
                    names = ast.literal_eval(node.value)
                except ValueError:  # built from a table: read the module
                    names = importlib.import_module(module).__all__
                for name in names:
                    where[name].append(module)
    return where


def test_each_public_name_is_exported_from_one_path():
    twice = {name: mods for name, mods in _exports().items() if len(mods) > 1}
    # same spelling, different objects (the demo's segment endpoint and the run engine's command)
    twice.pop("run_segment", None)
    assert twice == {}


def test_every_exported_name_exists():
    missing = [f"{mod}.{name}" for name, mods in _exports().items() for mod in mods
               if not hasattr(importlib.import_module(mod), name)]
    assert missing == []


def test_text_segment_has_one_public_path_and_the_old_ones_still_import():
    import difffeat
    from difffeat.backbones import TextSegment as a
    from difffeat.segment import TextSegment as b

    assert _exports()["TextSegment"] == ["difffeat"]
    assert a is b is difffeat.TextSegment
