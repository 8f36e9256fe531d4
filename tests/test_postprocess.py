"""PAMR and dense CRF post-processing (issue 17, item 4)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from difffeat.errors import ConfigError, MissingExtraError
from difffeat.segment.postprocess import CrfParams, PamrParams, dense_crf_labels, pamr_affinity, pamr_labels, pamr_refine


def _naive_affinity(img: np.ndarray, dilations) -> tuple[list, np.ndarray]:
    """Independent loop transcription of PAMR's affinity for one image ``[C, H, W]``: per pixel, the offsets
    of its neighbours and the softmax weights."""
    c, h, w = img.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    window = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    alpha = np.zeros((len(offsets), h, w))
    at = lambda y, x: img[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]  # replicate padding
    for y in range(h):
        for x in range(w):
            vals = np.stack([at(y + oy, x + ox) for oy, ox in window])  # [9 * nd, C]
            sigma = vals.std(axis=0, ddof=1)
            k = np.array([-(np.abs(img[:, y, x] - at(y + oy, x + ox)) / (1e-8 + 0.1 * sigma)).mean() for oy, ox in offsets])
            e = np.exp(k - k.max())
            alpha[:, y, x] = e / e.sum()
    return offsets, alpha


def test_pamr_affinity_and_one_update_match_a_loop_transcription():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (3, 5, 7))
    masks = rng.uniform(0, 1, (2, 5, 7))
    offsets, alpha = _naive_affinity(img, (1, 2))
    got = pamr_affinity(torch.tensor(img)[None], (1, 2))[0, 0].double().numpy()
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(alpha, axis=0), rtol=1e-5, atol=1e-7)
    h, w = img.shape[1:]
    expected = np.zeros_like(masks)
    for y in range(h):
        for x in range(w):
            for p, (oy, ox) in enumerate(offsets):
                expected[:, y, x] += alpha[p, y, x] * masks[:, min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)]
    out = pamr_refine(torch.tensor(masks)[None], torch.tensor(img)[None], PamrParams(iterations=1, dilations=(1, 2)))
    np.testing.assert_allclose(out[0].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pamr_moves_a_misplaced_label_boundary_onto_the_image_edge():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 200
    img = (img + np.random.default_rng(1).integers(0, 6, img.shape)).astype(np.uint8)  # texture: sigma > 0
    labels = np.zeros((32, 32), np.uint8)
    labels[:, 12:] = 1  # boundary 4 px left of the image edge
    refined = pamr_labels(labels, img, 2)
    truth = (np.arange(32) >= 16)[None].repeat(32, 0)
    assert (refined == truth).mean() > (labels == truth).mean() + 0.05
    assert (refined == truth).mean() > 0.97


#: only the tests that run the dense CRF itself need the optional [crf] extra; the rest run everywhere
try:
    import pydensecrf.densecrf  # noqa: F401

    HAVE_CRF = True
except ImportError:
    HAVE_CRF = False
needs_crf = pytest.mark.skipif(not HAVE_CRF, reason="the [crf] extra (pydensecrf2) is not installed")


@needs_crf
def test_dense_crf_without_pairwise_terms_is_the_argmax():
    rng = np.random.default_rng(2)
    scores = rng.uniform(0.01, 1, (3, 20, 24)).astype(np.float32)
    img = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
    out = dense_crf_labels(scores, img, CrfParams(pos_w=0.0, bi_w=0.0))
    np.testing.assert_array_equal(out, scores.argmax(0))


@needs_crf
def test_dense_crf_cleans_noisy_scores_along_image_regions():
    rng = np.random.default_rng(3)
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255
    truth = (np.arange(40) >= 20)[None].repeat(40, 0).astype(np.uint8)
    scores = np.stack([1 - truth, truth]).astype(np.float32) * 0.2 + 0.4 + rng.uniform(-0.35, 0.35, (2, 40, 40)).astype(np.float32)
    noisy = scores.argmax(0)
    out = dense_crf_labels(scores.clip(0.01, 1), img)
    assert (noisy == truth).mean() < 0.9
    assert (out == truth).mean() > 0.98


def test_crf_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    from difffeat.segment import SegmentSettings

    with pytest.raises(MissingExtraError, match=r"difffeat\[crf\]"):
        SegmentSettings(postprocess="crf")


def test_unknown_postprocess_is_a_config_error():
    from difffeat.segment import SegmentSettings

    with pytest.raises(ConfigError, match="postprocess='blur' is not one of"):
        SegmentSettings(postprocess="blur")


@pytest.mark.parametrize("method", ["pamr", pytest.param("crf", marks=needs_crf)])
def test_segmenter_postprocess_applies_to_the_labels_and_to_every_tau(method):
    from difffeat import Segmenter
    from difffeat.segment.postprocess import postprocess_labels
    from difffeat.segment.segmenter import decide
    from difffeat.shapes import world

    sample = world.sample("test", 1)
    seg = Segmenter("shapes", postprocess=method)
    result = seg(sample.image, ["circle", "square", "triangle"])
    assert result.settings["postprocess"] == method
    plain = decide(result.class_maps[None], result.background[None], result.labels.shape)[0]
    image = np.asarray(sample.image.convert("RGB"))
    for tau in (-0.2, 0.3):
        moved = result.with_tau(tau)
        base = decide(result.class_maps[None], (tau + result.support)[None], result.labels.shape)[0]
        assert moved.labels.shape == base.shape
        np.testing.assert_array_equal(moved.labels, decide(result.class_maps[None], (tau + result.support)[None], result.labels.shape, method, image)[0])
    assert result.labels.shape == plain.shape and result.labels.max() <= 3
    assert postprocess_labels("none", torch.zeros(1), plain, None) is plain


def test_cli_segment_postprocess_option(tmp_path):
    import json

    from typer.testing import CliRunner

    from difffeat.cli import app
    from difffeat.resources import package_dir

    image = package_dir() / "examples" / "shapes_test_0001.png"
    runner = CliRunner()
    ok = runner.invoke(app, ["segment", str(image), "--classes", "circle,square", "--out", str(tmp_path), "--postprocess", "pamr"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "shapes_test_0001.json").read_text())["settings"]["postprocess"] == "pamr"
    bad = runner.invoke(app, ["segment", str(image), "--classes", "circle", "--out", str(tmp_path), "--postprocess", "blur"])
    assert bad.exit_code != 0 and "postprocess='blur' is not one of" in bad.output


def test_postprocess_benchmark_runs_and_reports_every_row(tmp_path):
    import json

    from _helpers import load_benchmark

    out = tmp_path / "pp.json"
    load_benchmark("postprocess_shapes").main(["--n-val", "2", "--n-test", "2", "--methods", "none,pamr", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["postprocess"] for r in rows] == ["none", "pamr"]
    assert all(0 <= r["miou"] <= 1 for r in rows) and rows[0]["decision_time_vs_none"] == 1.0


@pytest.mark.parametrize("command", ["segment", "evaluate_dataset"])
def test_bad_postprocess_fails_before_the_model_loads(tmp_path, monkeypatch, command):
    from difffeat.runs import commands

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr("difffeat.backbones.load", no_load)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    with pytest.raises(ConfigError, match="postprocess='blur'"):
        if command == "segment":
            commands.segment([image], "circle", out_dir=tmp_path / "out", num_workers=0, postprocess="blur")
        else:
            commands.evaluate_dataset("shapes", shapes_split="test", n=2, out_dir=tmp_path / "out", num_workers=0,
                                      postprocess="blur")
