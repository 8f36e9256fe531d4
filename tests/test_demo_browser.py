"""The demo in a real headless Chromium, as a first-time visitor uses it, at 1280 and 390 px wide.

Needs the Debian ``chromium`` package (``/usr/bin/chromium``) and the Python ``playwright`` package (its own
browser download is not used). Screenshots of every tab at both widths are written to a temporary folder, or
to ``$DIFFFEAT_SCREENSHOTS`` when set: ``DIFFFEAT_SCREENSHOTS=artifacts/demo pytest tests/test_demo_browser.py``
refreshes the committed ones (``artifacts/demo/demo_<tab>_<width>.png``).
"""

from __future__ import annotations

import io
import json
import os
import re
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

from difffeat.demo import ADVANCED_HELP, FALLBACK_NOTE, bundled_examples, launch  # noqa: E402
from difffeat.resources import package_dir  # noqa: E402
from difffeat.shapes.examples import read_examples  # noqa: E402

EXAMPLES = package_dir() / "examples"
SHAPES_INSTALLED = (package_dir() / "weights" / "shapes" / "model_index.json").is_file()
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
TIMEOUT = 120_000  # ms; the machine may be shared
#: the example the page opens with (the first bundled one) and its classes
FIRST_IMAGE, FIRST_CLASSES = bundled_examples()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("DIFFFEAT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shot(page, folder: Path, name: str) -> Path:
    """A full-page screenshot, quantised to 256 colours (a few hundred KB at most), after scrolling through the
    page so that lazily loaded pictures are in."""
    page.evaluate("async () => { for (let y = 0; y < document.body.scrollHeight; y += 400) { window.scrollTo(0, y); "
                  "await new Promise(r => setTimeout(r, 60)); } window.scrollTo(0, 0); }")
    page.wait_for_timeout(300)
    png = page.screenshot(full_page=True)
    path = folder / name
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)
    return path


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


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        yield b
        b.close()


def _open(browser, url: str, width: int):
    """A fresh page, once it shows its first-load result (the first example, segmented)."""
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.goto(url, wait_until="networkidle", timeout=TIMEOUT)
    page.wait_for_function("(document.querySelector('#seg-message') || {innerText: ''}).innerText.includes('segmented')",
                           timeout=TIMEOUT)
    return page


def _fetch_image(page, selector: str) -> Image.Image:
    return _fetch_image_at(page, page.locator(selector).first)


def _fetch_image_at(page, locator) -> Image.Image:
    return Image.open(io.BytesIO(page.request.get(locator.get_attribute("src")).body()))


def _classes_box(page):
    return page.locator("#seg-classes textarea, #seg-classes input").first


def _ticked(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('#seg-offer input:checked')].map(e => e.closest('label').innerText.trim())")


def _segment(page, image_path: Path | None, classes: str, expect_ok: bool = True) -> dict:
    """Upload (if given), type the classes, press Segment; what the page then shows."""
    if image_path is not None:
        page.locator("#seg-image input[type=file]").set_input_files(str(image_path))
        page.locator("#seg-image img").first.wait_for(timeout=TIMEOUT)  # the upload preview
    _classes_box(page).fill(classes)
    _run_and_wait(page, "#seg-run", "#seg-message")
    if expect_ok:
        assert "segmented" in page.locator("#seg-message").inner_text()
    return {
        "labels": _fetch_image(page, "#seg-labels img").convert("RGB"),
        "overlay": _fetch_image(page, "#seg-overlay img").convert("RGB"),
        "legend": page.locator("#seg-legend").inner_text(),
        "colours": _legend_colours(page),
        "message": page.locator("#seg-message").inner_text(),
        "status": page.locator("#model-status").inner_text(),
    }


def _legend_colours(page, legend: str = "#seg-legend") -> dict[str, tuple[int, int, int]]:
    items = page.locator(f"{legend} .difffeat-legend-item")
    return {items.nth(i).get_attribute("data-class"): tuple(map(int, items.nth(i).get_attribute("data-rgb").split(",")))
            for i in range(items.count())}


#: marks, before the click, when the status tracker of ``sel`` leaves its hidden state (the run is pending)
_WATCH = """sel => {
    const el = document.querySelector(sel);
    window.__pending_seen = false;
    const check = () => { const w = el.querySelector('.wrap'); if (w && !w.classList.contains('hide')) window.__pending_seen = true; };
    new MutationObserver(check).observe(el, {subtree: true, attributes: true, childList: true});
}"""
_DONE = """sel => { const w = document.querySelector(sel).querySelector('.wrap');
    return window.__pending_seen && (!w || w.classList.contains('hide')); }"""


def _run_and_wait(page, button: str, tracker: str) -> None:
    """Click ``button`` and wait until this run finished: its progress tracker (on ``tracker``, the only
    component that shows progress) went pending and is hidden again, so the outputs are this run's."""
    page.evaluate(_WATCH, tracker)
    page.locator(button).click()
    page.wait_for_function(_DONE, arg=tracker, timeout=TIMEOUT)
    page.wait_for_timeout(300)  # a failure step writes the message after the run


def _pixels(legend: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"(\w[\w ]*?) \((\d+) px\)", legend)}


def _blank_below(page, block: str, content: str) -> float:
    """Pixels of ``block`` below the bottom of its last ``content`` element (blank space in an output box)."""
    return page.evaluate("""([b, c]) => { const box = document.querySelector(b).getBoundingClientRect();
        const items = [...document.querySelectorAll(b + ' ' + c)];
        const bottom = Math.max(...items.map(e => e.getBoundingClientRect().bottom));
        return box.bottom - bottom; }""", [block, content])


# --------------------------------------------------------------------------- Segment
def test_first_load_shows_the_first_example_segmented_with_its_boxes_ticked(served, browser, shots):
    url, _ = served
    page = _open(browser, url, 1280)
    try:
        image_box = page.locator("#seg-image").bounding_box()
        examples_box = page.locator("#seg-examples").bounding_box()
        overlay_box = page.locator("#seg-overlay").bounding_box()
        status = page.locator("#model-status").inner_text()
        classes = _classes_box(page).input_value()
        legend = page.locator("#seg-legend").inner_text()
        colours = _legend_colours(page)
        ticked = _ticked(page)
        shown = _fetch_image(page, "#seg-image img").convert("RGB")
        labels = _fetch_image(page, "#seg-labels img").convert("RGB")
        download = page.locator("#seg-file a").first.get_attribute("href")
        failures = page.locator("#seg-failures").inner_text()
        normal = page.locator("#seg-examples").inner_text()
        blank_heat = _blank_below(page, "#seg-heat", ".gallery-item")
        file_height = page.locator("#seg-file").bounding_box()["height"]
        _shot(page, shots, "demo_segment_1280.png")
    finally:
        page.close()
    assert "family" in status and "not loaded" not in status.lower()
    assert classes == FIRST_CLASSES and set(_pixels(legend)) == {"background", *FIRST_CLASSES.split(", ")}
    # the examples sit right under the image, above the outputs' bottom; the result is there without a click
    assert image_box["y"] < examples_box["y"] < overlay_box["y"] + overlay_box["height"]
    if SHAPES_INSTALLED:  # clicking nothing ticked the boxes of the example's classes
        assert sorted(ticked) == sorted(FIRST_CLASSES.split(", "))
    # the label colours are none of the image's own colours (0001's square is the fixed palette's yellow)
    own = {tuple(c) for c in np.asarray(shown).reshape(-1, 3)}
    assert not own & {c for name, c in colours.items() if name != "background"}
    assert {tuple(c) for c in np.asarray(labels).reshape(-1, 3)} <= set(colours.values())
    # downloads are named after the input; the failure case is listed apart, labelled as one
    assert download.endswith(f"/{Path(FIRST_IMAGE).stem}-labels.png")
    assert "0009" in failures and "known failure" in failures and "swaps the square and the star" in failures
    assert "0009" not in normal
    assert blank_heat < 40 and file_height < 150  # no tall blank output boxes


def test_segment_defaults_equal_advanced_opened_and_every_option_has_help(served, browser):
    url, _ = served
    entry = next(e for e in read_examples(EXAMPLES) if e["file"] == "shapes_test_0006.png")
    classes = list(entry["classes_present"])
    size = Image.open(entry["path"]).size
    page = _open(browser, url, 1280)
    try:
        plain = _segment(page, entry["path"], ", ".join(classes))
        page.locator("#seg-advanced").get_by_text("Advanced").first.click()
        page.locator("#seg-t input, #seg-t textarea").first.wait_for(timeout=TIMEOUT)
        advanced = page.locator("#seg-advanced").inner_text()
        opened = _segment(page, None, ", ".join(classes))
    finally:
        page.close()
    for help_line in ADVANCED_HELP.values():  # one visible line of help per option, goca/mean/uniform/none included
        assert help_line in advanced
    assert "mean: plain average over heads" in advanced and "uniform: every layer counts the same" in advanced
    # 1. opening Advanced without touching it changes nothing
    assert _pixels(plain["legend"]) == _pixels(opened["legend"]) and _pixels(plain["legend"])
    assert np.array_equal(np.asarray(plain["labels"]), np.asarray(opened["labels"]))
    # 2. the label map is shown enlarged by an integer factor, nearest: only the legend's colours, square blocks
    labels = np.asarray(plain["labels"])
    k = labels.shape[1] // size[0]
    assert k >= 4 and labels.shape[:2] == (size[1] * k, size[0] * k)
    allowed = np.array(list(plain["colours"].values()))
    assert (labels.reshape(-1, 3)[:, None] == allowed[None]).all(-1).any(-1).all(), "blended pixel values in the label map"
    blocks = labels.reshape(size[1], k, size[0], k, 3)
    assert (blocks == blocks[:, :1, :, :1]).all(), "label map not enlarged nearest-neighbour"
    # the overlay is shown at the same size, its outlines drawn in the legend's exact colours
    overlay = np.asarray(plain["overlay"])
    assert overlay.shape == labels.shape
    assert set(plain["colours"]) == {"background", *classes}
    class_colors = np.array([c for n, c in plain["colours"].items() if n != "background"])
    assert (overlay.reshape(-1, 3)[:, None] == class_colors[None]).all(-1).any(0).any(), "no legend colour in the overlay"
    if SHAPES_INSTALLED:
        coloured = (blocks[:, 0, :, 0] != 0).any(-1)
        objects = np.asarray(Image.open(entry["mask_path"])) > 0
        assert coloured[objects].mean() > 0.5 and coloured[~objects].mean() < 0.5
        assert FALLBACK_NOTE not in plain["status"]


def test_an_unknown_word_is_left_out_with_a_message_and_the_known_classes_keep_their_labels(served, browser):
    if not SHAPES_INSTALLED:
        pytest.skip("the random fallback model has an open vocabulary")
    url, _ = served
    example = EXAMPLES / "shapes_test_0001.png"
    page = _open(browser, url, 1280)
    try:
        known = page.locator("#seg-known").inner_text()
        alone = _segment(page, example, "square, ring, diamond")
        banana = _segment(page, None, "square, ring, diamond, banana")
        warning_visible = page.locator("#seg-message .difffeat-warning").first.is_visible()
        typo = _segment(page, None, "circel, Stars")
    finally:
        page.close()
    assert "circle" in known and "diamond" in known  # the page lists the classes the model knows
    assert warning_visible and "left out: 'banana' is not a word this model knows" in banana["message"]
    assert "banana" not in banana["colours"]
    assert np.array_equal(np.asarray(alone["labels"]), np.asarray(banana["labels"]))  # banana ruins nothing
    assert "'circel' is not a word this model knows" in typo["message"] and "did you mean 'circle'" in typo["message"]
    assert "“Stars” was read as “star”" in typo["message"]
    assert set(_pixels(typo["legend"])) == {"background", "star"}


def test_ticking_a_class_adds_to_the_typed_ones_and_an_example_ticks_its_classes(served, browser):
    if not SHAPES_INSTALLED:
        pytest.skip("the random fallback model has an open vocabulary: no class boxes")
    url, _ = served
    page = _open(browser, url, 390)
    try:
        box = _classes_box(page)
        box.fill("cross, my thing")
        page.wait_for_function("() => [...document.querySelectorAll('#seg-offer input:checked')].length === 1",
                               timeout=TIMEOUT)
        typed_ticks = _ticked(page)
        page.locator("#seg-offer").get_by_text("heart", exact=True).click()
        page.wait_for_function("e => e.value.includes('heart')", arg=box.element_handle(), timeout=TIMEOUT)
        added = box.input_value()
        page.locator("#seg-offer").get_by_text("cross", exact=True).click()
        page.wait_for_function("e => !e.value.includes('cross')", arg=box.element_handle(), timeout=TIMEOUT)
        removed = box.input_value()
        page.evaluate(_WATCH, "#seg-message")
        page.locator("#seg-examples").get_by_text("cross, square").first.click()
        page.wait_for_function("e => e.value === 'cross, square'", arg=box.element_handle(), timeout=TIMEOUT)
        page.wait_for_function(_DONE, arg="#seg-message", timeout=TIMEOUT)  # the click also segments it
        page.wait_for_timeout(300)
        example_ticks = _ticked(page)
        legend = page.locator("#seg-legend").inner_text()
        download = page.locator("#seg-file a").first.get_attribute("href")
    finally:
        page.close()
    assert typed_ticks == ["cross"]
    assert added == "cross, my thing, heart" and removed == "my thing, heart"
    assert sorted(example_ticks) == ["cross", "square"]
    assert set(_pixels(legend)) == {"background", "cross", "square"} and download.endswith("/shapes_test_0006-labels.png")


def test_errors_stay_beside_the_button_and_a_non_image_upload_is_cleared(served, browser, tmp_path):
    url, _ = served
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file, not a PNG")
    page = _open(browser, url, 390)
    try:
        _segment(page, None, " , ", expect_ok=False)
        page.wait_for_timeout(11_000)  # longer than gradio's toast lasts
        empty = page.locator("#seg-message").inner_text()
        page.locator("#seg-image input[type=file]").set_input_files(str(fake))
        page.wait_for_function("document.querySelector('#seg-message').innerText.includes('cannot read')", timeout=TIMEOUT)
        page.wait_for_timeout(500)
        upload = page.locator("#seg-message").inner_text()
        previews = page.locator("#seg-image img").count()
        badges = [page.locator(panel).inner_text() for panel in ("#seg-overlay", "#seg-labels", "#seg-legend")]
        page.get_by_role("tab", name="Features").click()
        page.locator("#f-t input, #f-t textarea").first.fill("abc")
        page.locator("#f-image input[type=file]").set_input_files(FIRST_IMAGE)
        page.locator("#f-image img").first.wait_for(timeout=TIMEOUT)
        _run_and_wait(page, "#f-run", "#f-message")
        features = page.locator("#f-message").inner_text()
    finally:
        page.close()
    assert "empty class list" in empty and "Error" != empty.strip()
    assert "'holiday.png'" in upload and "/tmp" not in upload and "numpy" not in upload
    assert previews == 0, "the unreadable upload is still shown (a broken-image icon)"
    assert not any("Error" in b for b in badges), "an output panel shows an error badge"
    assert "timestep t must be a number, got 'abc'" in features


def test_a_failed_load_model_says_so_on_the_status_line(served, browser):
    url, _ = served
    page = _open(browser, url, 1280)
    try:
        page.locator("#model-box textarea, #model-box input").first.fill("/no/such/folder")
        page.locator("#load-model").click()
        page.wait_for_function("document.querySelector('#model-status').innerText.includes('could not be loaded')",
                               timeout=TIMEOUT)
        status = page.locator("#model-status").inner_text()
    finally:
        page.close()
    assert "/no/such/folder could not be loaded" in status and "family" not in status


# --------------------------------------------------------------------------- Features
def test_features_tab_extracts_the_recommended_preset_and_a_catalog_click_picks_an_activation(served, browser, shots,
                                                                                              tmp_path):
    from safetensors import safe_open

    url, _ = served
    page = _open(browser, url, 1280)
    try:
        page.get_by_role("tab", name="Features").click()
        pca_hidden = not page.locator("#f-pca").is_visible()  # no empty picture box before a result
        page.locator("#f-image input[type=file]").set_input_files(FIRST_IMAGE)
        page.locator("#f-image img").first.wait_for(timeout=TIMEOUT)
        page.locator("#f-run").click()
        page.wait_for_function("document.querySelector('#f-info').innerText.includes('t=')", timeout=TIMEOUT)
        page.locator("#f-pca img").first.wait_for(timeout=TIMEOUT)
        info = page.locator("#f-info").inner_text()
        href = page.locator("#f-file a").first.get_attribute("href")
        pca = _fetch_image(page, "#f-pca img")
        page.locator("#f-catalog-box").get_by_text("Activation catalog").first.click()
        cell = page.locator("#f-catalog .body-cell.first-column").nth(3)
        cell.wait_for(timeout=TIMEOUT)
        picked = cell.inner_text().replace("\n", "")
        cell.click()
        act = page.locator("#f-act input").first
        page.wait_for_function("([e, v]) => e.value === v", arg=[act.element_handle(), picked], timeout=TIMEOUT)
        _shot(page, shots, "demo_features_1280.png")
        data = page.request.get(href).body()
    finally:
        page.close()
    assert pca_hidden
    assert href.endswith(f"/{Path(FIRST_IMAGE).stem}-features.safetensors")
    (tmp_path / "f.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["t"]) == 50, meta  # the file records the t it was extracted at (not 0)
    if SHAPES_INSTALLED:
        assert info.startswith("preset:shapes-practical at t=50 (the preset's)")
    else:
        assert "at t=50 (the model's default)" in info
    assert min(pca.size) >= 256  # shown at a readable size
    assert "." in picked and " " not in picked  # a catalog name, exact (no markup, no inserted characters)


def _line_ends(page, selector: str) -> list[str]:
    """The text of each rendered line of the element ``selector`` (how the browser wrapped it)."""
    return page.evaluate("""sel => { const el = document.querySelector(sel); const lines = [];
        const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT); let node, top = null;
        while ((node = walker.nextNode())) { for (let i = 0; i < node.length; i++) {
            const r = document.createRange(); r.setStart(node, i); r.setEnd(node, i + 1);
            const t = Math.round(r.getBoundingClientRect().top);
            if (top === null || Math.abs(t - top) > 3) { lines.push(''); top = t; }
            lines[lines.length - 1] += node.data[i]; } }
        return lines; }""", selector)


def test_the_catalog_on_a_phone_shows_name_and_kind_with_names_wrapped_at_dots(served, browser):
    url, _ = served
    page = _open(browser, url, 390)
    try:
        page.get_by_role("tab", name="Features").click()
        page.locator("#f-catalog-box").get_by_text("Activation catalog").first.click()
        page.locator("#f-catalog .body-cell.first-column").nth(5).wait_for(timeout=TIMEOUT)
        heads = page.locator("#f-catalog th.header-cell")
        visible = {heads.nth(i).inner_text().strip(): heads.nth(i).bounding_box() for i in range(heads.count())
                   if heads.nth(i).is_visible()}
        names = page.locator("#f-catalog .body-cell.first-column")
        longest = max(range(min(names.count(), 12)), key=lambda i: len(names.nth(i).inner_text()))
        page.evaluate("i => document.querySelectorAll('#f-catalog .body-cell.first-column')[i].id = 'longest-name'", longest)
        lines = [line for line in _line_ends(page, "#longest-name") if line.strip()]
    finally:
        page.close()
    assert {"name", "kind", "shape"} <= set(visible) and not {"resolution", "flags"} & set(visible)
    assert all(visible[h]["x"] + visible[h]["width"] <= 390 for h in ("name", "kind")), visible  # shape: a swipe away
    assert len(lines) > 1 and all(line.rstrip().endswith(".") for line in lines[:-1]), lines  # never mid-word


# --------------------------------------------------------------------------- Content shift + every tab
def _compare(page) -> dict:
    """Run the Content shift comparison on the first example (2 steps); captions, picture sizes, verdict."""
    page.get_by_role("tab", name="Content shift").click()
    page.locator("#g-image input[type=file]").set_input_files(FIRST_IMAGE)
    page.locator("#g-image img").first.wait_for(timeout=TIMEOUT)
    steps = page.locator("#g-steps input[type=number]").first
    steps.fill("2")
    steps.press("Enter")
    page.locator("#g-run").click()
    page.locator("#g-panels img").nth(2).wait_for(timeout=TIMEOUT)
    page.wait_for_function("document.querySelector('#g-verdict').innerText.includes('PSNR')", timeout=TIMEOUT)
    imgs = page.locator("#g-panels img")
    captions = page.locator("#g-panels .caption-label")
    return {
        "sizes": [_fetch_image_at(page, imgs.nth(i)).size for i in range(3)],
        "captions": captions.all_inner_texts(),
        "cut": page.evaluate("[...document.querySelectorAll('#g-panels .caption-label')].map(e => e.scrollWidth > e.clientWidth + 1)"),
        "verdict": page.locator("#g-verdict").inner_text(),
        "table": page.locator("#g-verdict table").count(),
        "json": page.locator("#g-json").count(),
        "blank": _blank_below(page, "#g-panels", ".gallery-item"),
    }


@pytest.mark.parametrize("width", [1280, 390])
def test_every_tab_with_a_result_and_content_shift_explains_itself(served, browser, shots, width):
    url, _ = served
    page = _open(browser, url, width)
    try:
        _shot(page, shots, f"demo_segment_{width}.png") if width == 390 else None
        if width == 390:  # a click on an example thumbnail extracts from it
            page.get_by_role("tab", name="Features").click()
            page.locator("#f-examples img").first.click()
            page.locator("#f-pca img").first.wait_for(timeout=TIMEOUT)
            _shot(page, shots, "demo_features_390.png")
            info = page.locator("#f-info").inner_text()
            assert "at t=" in info and all(c["x"] + c["width"] <= 390 for c in page.evaluate(
                "[...document.querySelectorAll('#f-info code')].map(e => e.getBoundingClientRect().toJSON())"))
        compared = _compare(page)
        page.get_by_role("tab", name="Content shift").click()
        _shot(page, shots, f"demo_content_shift_{width}.png")
    finally:
        page.close()
    assert all((shots / f"demo_{t}_{width}.png").is_file() for t in ("segment", "content_shift"))
    assert [c.split(" (")[0] for c in compared["captions"]] == ["input", "without the technique", "with the technique"]
    assert not any(compared["cut"]), "a caption is cut off"
    assert min(min(s) for s in compared["sizes"]) >= 256  # readable, not 64 px
    assert re.match(r"The technique (helps|does not help) here", compared["verdict"])
    assert "PSNR to the input" in compared["verdict"] and compared["table"] == 1 and compared["json"] == 0
    assert not re.search(r"\d\.\d{4,}", compared["verdict"]), "long floats"
    assert compared["blank"] < 40


# --------------------------------------------------------------------------- Generate
def _generate_tab(page, classes: str | None = None, scale: str | None = None, guidance: str | None = None) -> str:
    """Open the Generate tab, set what is given, press Generate and wait for this run; the message line."""
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-run").wait_for(timeout=TIMEOUT)
    if classes is not None:
        page.locator("#gen-classes textarea, #gen-classes input").first.fill(classes)
    if scale is not None:
        box = page.locator("#gen-scale input").first
        box.fill(scale)
        box.press("Tab")
    if guidance is not None:
        page.locator("#gen-guidance").get_by_text(guidance, exact=True).click()
    _run_and_wait(page, "#gen-run", "#gen-message")
    return page.locator("#gen-message").inner_text()


@pytest.mark.parametrize("width", [1280, 390])
def test_generate_tab_shows_the_image_its_label_map_and_class_scores_within_the_screen(served, browser, shots, width):
    url, _ = served
    page = _open(browser, url, width)
    try:
        page.get_by_role("tab", name="Generate").click()
        page.locator("#gen-run").wait_for(timeout=TIMEOUT)
        hidden_before = not page.locator("#gen-image").is_visible()  # no empty picture boxes before a result
        placeholder = page.locator("#gen-classes textarea, #gen-classes input").first.get_attribute("placeholder")
        message = _generate_tab(page)
        page.locator("#gen-labels img").first.wait_for(timeout=TIMEOUT)
        page.locator("#gen-heat img").first.wait_for(timeout=TIMEOUT)
        image = _fetch_image(page, "#gen-image img").convert("RGB")
        labels = _fetch_image(page, "#gen-labels img").convert("RGB")
        colours = _legend_colours(page, "#gen-legend")
        downloads = [a.get_attribute("href") for a in page.locator("#gen-files a").all()]
        heat_captions = page.locator("#gen-heat .caption-label").all_inner_texts()
        boxes = {sel: page.locator(sel).bounding_box() for sel in ("#gen-image", "#gen-overlay", "#gen-labels", "#gen-heat",
                                                                   "#gen-files", "#gen-run", "#gen-message")}
        page_width = page.evaluate("document.documentElement.scrollWidth")
        cut_names = page.evaluate("[...document.querySelectorAll('#gen-files .filename')]"
                                  ".map(e => e.scrollWidth > e.clientWidth + 1 || e.innerText.includes('\u2026'))")
        _shot(page, shots, f"demo_generate_{width}.png")
    finally:
        page.close()
    assert hidden_before
    if SHAPES_INSTALLED:
        assert placeholder == "blank = the prompt's class words: circle, star"
        assert heat_captions == ["circle", "star"] and set(colours) == {"background", "circle", "star"}
    assert "generated 64x64 px: 10 steps, scfg-goca at guidance scale 5, seed 0" in message
    assert min(image.size) >= 256 and labels.size == image.size  # shown enlarged, not 64 px
    assert {tuple(c) for c in np.asarray(labels).reshape(-1, 3)} <= set(colours.values())
    names = [d.rsplit("/", 1)[-1] for d in downloads]
    stem = "a-red-circle-and-a-blue_seed0_scfg-goca"
    assert names == [f"{stem}.png", f"{stem}_labels.png", f"{stem}_overlay.png", f"{stem}.json"]
    assert not any(cut_names), "a download name is cut off"
    assert page_width <= width, "the page scrolls sideways"
    assert all(b["x"] >= 0 and b["x"] + b["width"] <= width + 1 for b in boxes.values()), boxes
    # the message line is right under the button
    assert 0 <= boxes["#gen-message"]["y"] - (boxes["#gen-run"]["y"] + boxes["#gen-run"]["height"]) < 60


def test_generate_errors_and_warnings_stay_beside_the_button(served, browser):
    url, _ = served
    page = _open(browser, url, 390)
    try:
        error = _generate_tab(page, scale="1", guidance="scfg")
        error_role = page.locator("#gen-message .difffeat-error").count()
        warning = _generate_tab(page, classes="circle, square", scale="5", guidance="cfg")
        warning_visible = page.locator("#gen-message .difffeat-warning").first.is_visible()
    finally:
        page.close()
    assert error_role == 1 and "use a guidance_scale > 1" in error and "Traceback" not in error
    assert warning_visible and "class 'square' is not a word of the prompt" in warning
    assert "its words: a, red, circle" in warning and "segmented into circle;" in warning
