"""The README's Python section runs offline exactly as written, from any folder, and prints what its comments
say it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_python_block() -> str:
    """The first ```python block under the README's "## Python" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python section lost its code block"
    return match.group(1)


def test_the_readme_python_snippet_runs_offline_and_prints_what_it_says(tmp_path):
    code = readme_python_block()
    # each `print(...)` line is followed by a comment line giving its output
    lines = code.splitlines()
    claimed = [lines[i + 1].lstrip("# ").strip() for i, line in enumerate(lines[:-1]) if line.startswith("print(")]
    assert len(claimed) == 3 and all(lines[i + 1].startswith("# ") for i, line in enumerate(lines[:-1]) if line.startswith("print("))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == claimed, (run.stdout, claimed)
