"""Execute the notebooks in ``notebooks/`` (nbclient) so they cannot rot.

They run on the embedded shapes model when it is installed, else on a tiny random-weight pipeline, and
assert their own claims (hand-built GOCA equals ``Segmenter``; content drift grows with t).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (pip install 'difffeat[test]')")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (pip install 'difffeat[test]')")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel")
pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist_and_are_stored_executed():
    """Stored with their outputs (``python notebooks/execute.py``), so they read as walkthroughs on GitHub."""
    assert [p.name for p in NOTEBOOKS] == ["01_features.ipynb", "02_goca.ipynb", "03_content_shift.ipynb"]
    for path in NOTEBOOKS:
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom ({counts})"
        outputs = [o for c in code for o in c.outputs]
        assert any("image/png" in o.get("data", {}) for o in outputs), path.name
        assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"], path.name


@pytest.mark.timeout(900)  # ~9 s each on a quiet 2-core CPU: part of the default suite, so they cannot rot
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, tmp_path):
    # the kernel is a child process: make this checkout importable and keep it offline and light
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend captures figures
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook should draw at least one figure"
