"""The demo in a real headless Chromium: upload an example, enter classes, segment, inspect the result.

Needs the Debian ``chromium`` package (``/usr/bin/chromium``) and the Python ``playwright`` package (its own
browser download is not used). A screenshot is written to ``artifacts/demo_browser.png`` (git-ignored).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("DIFFFEAT_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
    pytest.skip(f"chromium not installed (looked for {CHROMIUM}); apt-get install chromium", allow_module_level=True)
CHROMIUM = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'difffeat[demo]')")

from playwright.sync_api import sync_playwright  # noqa: E402

from difffeat.demo import FALLBACK_NOTE, launch  # noqa: E402
from difffeat.resources import package_dir  # noqa: E402
from difffeat.segment.outputs import palette  # noqa: E402
from difffeat.shapes.examples import read_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
EXAMPLES = package_dir() / "examples"
SHAPES_INSTALLED = (package_dir() / "weights" / "shapes" / "model_index.json").is_file()
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, model) of the demo served in this process: shapes when installed, else a tiny random SD."""
    if SHAPES_INSTALLED:
        model = "shapes"
    else:
        from difffeat.testing import save_tiny_pipeline

        model = str(save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny-sd")))
    demo = launch(model, port=_free_port(), concurrency=1, block=False, preload=True)
    yield demo.local_url, model
    demo.close()


#: a two-object example; the shipped shapes model separates objects from background well but confuses shape
#: identities in crowded scenes (see benchmarks/results/goca_shapes.json), which this end-to-end test is not about
EXAMPLE_FILE = "shapes_test_0006.png"


def _example() -> tuple[Path, Path, list[str]]:
    entry = next(e for e in read_examples(EXAMPLES) if e["file"] == EXAMPLE_FILE)
    return entry["path"], entry["mask_path"], list(entry["classes_present"])


def test_segment_in_headless_chromium(served, tmp_path):
    url, model = served
    image_path, mask_path, classes = _example()
    size = Image.open(image_path).size
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.locator("#seg-image input[type=file]").set_input_files(str(image_path))
            page.locator("#seg-image img").first.wait_for(timeout=30_000)  # the upload preview
            page.locator("#seg-classes textarea, #seg-classes input").first.fill(", ".join(classes))
            page.locator("#seg-run").click()
            labels_img = page.locator("#seg-labels img").first
            labels_img.wait_for(timeout=180_000)
            page.locator("#seg-overlay img").first.wait_for(timeout=30_000)
            page.locator("#seg-legend .difffeat-legend").wait_for(timeout=30_000)
            labels = Image.open(io.BytesIO(page.request.get(labels_img.get_attribute("src")).body())).convert("RGB")
            overlay_src = page.locator("#seg-overlay img").first.get_attribute("src")
            overlay = Image.open(io.BytesIO(page.request.get(overlay_src).body()))
            status = page.locator("#model-status").inner_text()
            legend = page.locator("#seg-legend").inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo_browser.png"), full_page=True)
            page.screenshot(path=str(tmp_path / "demo_browser.png"), full_page=True)
        finally:
            browser.close()

    assert overlay.size == size and labels.size == size
    for cls in classes:
        assert cls in legend
    pixels = np.asarray(labels).reshape(-1, 3)
    allowed = palette()[: len(classes) + 1]
    is_palette = (pixels[:, None, :] == allowed[None]).all(-1).any(-1)
    assert is_palette.all(), "label image has colours outside the class palette"
    if SHAPES_INSTALLED:
        coloured = (np.asarray(labels) != 0).any(-1)
        objects = np.asarray(Image.open(mask_path)) > 0
        covered = coloured[objects].mean()
        assert covered > 0.5, f"only {covered:.0%} of the object pixels are labelled"
        spill = coloured[~objects].mean()
        assert spill < 0.5, f"{spill:.0%} of the background pixels are labelled as objects"
        assert FALLBACK_NOTE not in status
