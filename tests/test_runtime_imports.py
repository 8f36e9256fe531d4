"""The runtime import graph: using the library or its CLI imports no test builder, benchmark or training code.

Test builders (:mod:`difffeat.testing`, the real-size random-weight configs of :mod:`difffeat.architectures`),
benchmarks and the shapes-model trainer (:mod:`difffeat.devtools`) are imported only by the commands that need
them (``difffeat bench``, ``make-tiny``, ``make-single-file``), inside those commands.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "difffeat"

#: modules that are not runtime library: test builders, benchmarks, training
NOT_RUNTIME = ("difffeat.testing", "difffeat.architectures", "difffeat.devtools")
#: the only places a runtime module may import them: (file, function) — each imports it inside the command
LAZY_ALLOWED = {("cli.py", "bench"), ("cli.py", "make_tiny"), ("cli.py", "make_single_file")}


def _imported_modules(*args: str) -> list[str]:
    """The modules ``python -X importtime ARGS`` imports (read from its import-time report on stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT.parent)}
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln.split("|")[-1] for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    return [ln.strip() for ln in lines[1:]]  # the first line is the header


def _not_runtime(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(NOT_RUNTIME)]


@pytest.mark.parametrize("args", [
    ("-c", "import difffeat; difffeat.Segmenter"),
    ("-m", "difffeat", "segment", "--help"),
    ("-m", "difffeat", "--help"),
], ids=["api-segmenter", "cli-segment-help", "cli-help"])
def test_runtime_imports_no_test_benchmark_or_training_module(args):
    modules = _imported_modules(*args)
    assert "difffeat" in modules  # the report was read
    assert _not_runtime(modules) == []


def test_the_import_report_would_show_a_test_module():
    """The check above can fail: importing difffeat.testing shows up in the report it reads."""
    assert "difffeat.testing" in _not_runtime(_imported_modules("-c", "import difffeat.testing"))


def _lazy_imports_of_non_runtime() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("testing.py", "architectures.py") or rel.startswith("devtools/"):
            continue
        module = ".".join(("difffeat", *path.relative_to(ROOT).with_suffix("").parts))
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                targets = [".".join([*base, node.module] if node.module else base)]
                targets += [f"{targets[0]}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            if not any(t.startswith(NOT_RUNTIME) for t in targets):
                continue
            scope = node
            while scope in parents and not isinstance(scope, ast.FunctionDef):
                scope = parents[scope]
            if (rel, getattr(scope, "name", None)) not in LAZY_ALLOWED:
                found.append(f"{rel}:{node.lineno}")
    return found


def test_only_the_commands_that_need_them_import_test_or_benchmark_code():
    assert _lazy_imports_of_non_runtime() == []
