"""The import graph of ``difffeat``: no cycle among its parts, and no import from a lower layer into a higher one.

Layers (design.md; lower first): shared basics < backbones < catalog < capture < features/presets < shift/segment
< evaluate/devtools (benchmarks, training) < runs < cli/demo/the package facade. Every import counts, also those inside functions: a
lazy import still makes the lower layer depend on the higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "difffeat"

#: unit (top-level module or subpackage of difffeat) -> layer; a unit may import its own layer or lower ones
LAYERS = [
    {"errors", "version", "checks", "resources", "images", "io", "hookpoints", "tokenizers"},
    {"shapes", "testing", "architectures"},  # synthetic data world, tiny offline models, real-size configs: diffusers + basics
    {"backbones"},
    {"catalog"},
    {"capture"},
    {"presets", "features", "families"},
    {"shift", "segment"},
    {"evaluate", "devtools", "tracing"},  # tracing: GOCA inside a generation, on top of segment
    {"runs"},
    {"cli", "demo", "serve", "__main__", "__init__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """``difffeat.capture.session`` -> ``capture``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported difffeat module, imported names, line)`` for every import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "difffeat"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "difffeat":
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def _edges():
    """``(importer unit, imported unit, file, line, names, target module)`` across units."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        src = _unit(_module_name(path)) if path.name != "__init__.py" or path.parent != ROOT else "__init__"
        for target, names, line in _imports(path):
            dst = _unit(target)
            if target == "difffeat":  # `from difffeat import x`: x is a submodule or a facade name
                for name in names:
                    d = name if name in LAYER else "__init__"
                    if d != src:
                        edges.append((src, d, path, line, [name], target))
            elif dst != src:
                edges.append((src, dst, path, line, names, target))
    return edges


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in ROOT.rglob("*.py")}
    assert units - set(LAYER) == set(), "give new modules a layer in LAYERS"


def test_no_import_from_a_lower_layer_into_a_higher_one():
    upward = [f"{p.relative_to(ROOT.parent)}:{line}: {src} (layer {LAYER[src]}) imports {target} {names} ({dst}, layer {LAYER[dst]})"
              for src, dst, p, line, names, target in _edges() if LAYER[dst] > LAYER[src]]
    assert upward == []


def test_no_import_cycle_among_units():
    graph: dict[str, set[str]] = {}
    for src, dst, *_ in _edges():
        graph.setdefault(src, set()).add(dst)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_imported_from_another_unit():
    private = [f"{p.relative_to(ROOT.parent)}:{line}: {target} {n}" for src, dst, p, line, names, target in _edges()
               for n in names if n.startswith("_") and n != "__version__"]
    assert private == []


@pytest.mark.parametrize("source, expect", [
    ("from ..segment.prompts import TextSegment\n", "upward"),
    ("from ..capture.session import Capture\n", "cycle"),
])
def test_the_checks_catch_a_planted_violation(tmp_path, source, expect):
    """Plant an import into a copy of backbones/ and check that the test above would fail."""
    import shutil

    root = tmp_path / "difffeat"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("_data", "weights", "examples", "__pycache__"))
    with open(root / "backbones" / "base.py", "a") as f:
        f.write("\n\ndef _planted():\n    " + source)
    globals()["ROOT"] = root
    try:
        edges = _edges()
        if expect == "upward":
            assert any(s == "backbones" and LAYER[d] > LAYER[s] for s, d, *_ in edges)
        else:
            with pytest.raises(AssertionError):
                test_no_import_cycle_among_units()
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1] / "difffeat"


def test_benchmark_scripts_import_only_the_library():
    """Benchmarks call difffeat instead of copying it or each other (issue 18)."""
    folder = ROOT.parent / "benchmarks"
    scripts = {p.stem for p in folder.glob("*.py")}
    crossing = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            crossing += [f"{path.name}: {n}" for n in names if n.split(".")[0] in scripts]
    assert crossing == []
