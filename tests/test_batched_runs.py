"""`segment` / `eval --batch-size N` through the run engine: N images per forward give the same output files
and the same report as batch 1, with images of mixed sizes and a different class list (and caption) per
image; a batched run resumes image by image (segment) and chunk by chunk (eval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from difffeat.cli import app
from difffeat.segment.segmenter import Segmenter
from difffeat.shapes import world

#: float results of different kernel paths compared within derived tolerances (`.ci/run` reruns these under a
#: second kernel set and one thread: `pytest -m numeric`)
pytestmark = pytest.mark.numeric

runner = CliRunner()
CLASSES = ",".join(world.SHAPE_CLASSES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Seven shapes images (VOC-style: images/ + labels/), three of them stretched to other sizes, a label file
    naming other classes per image, and a caption file with background entities."""
    root = tmp_path_factory.mktemp("batched")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    sizes = {1: (96, 64), 4: (64, 96), 5: (96, 64)}  # the others stay 64x64
    labels, captions = {}, {}
    for i in range(7):
        s = world.sample("test", i)
        image = s.image if isinstance(s.image, Image.Image) else Image.fromarray(np.asarray(s.image))
        mask = Image.fromarray(s.mask.astype(np.uint8))
        if i in sizes:
            image, mask = image.resize(sizes[i], Image.BILINEAR), mask.resize(sizes[i], Image.NEAREST)
        image.save(root / "images" / f"im{i}.png")
        mask.save(root / "labels" / f"im{i}.png")
        present = [world.SHAPE_CLASSES[v - 1] for v in np.unique(s.mask) if 0 < v <= len(world.SHAPE_CLASSES)]
        labels[f"im{i}"] = present if i % 3 else present + ["heart"]  # lists of different lengths
        captions[f"im{i}"] = ", ".join(present + ["background", "floor"][: 1 + i % 2])
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "captions.json").write_text(json.dumps(captions))
    return root


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """The number of images of every segmentation forward."""
    sizes: list[int] = []
    stock = Segmenter.observe_batch
    monkeypatch.setattr(Segmenter, "observe_batch", lambda self, images, *a, **k: sizes.append(len(images)) or stock(self, images, *a, **k))
    return sizes


def _segment(folder: Path, out: Path, batch: int, *extra: str) -> str:
    result = runner.invoke(app, ["segment", str(folder / "images"), "-c", CLASSES, "-o", str(out), "--num-workers", "0",
                                 "--batch-size", str(batch), "--label-file", str(folder / "labels.json"), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _outputs(out: Path) -> tuple[dict[str, bytes], dict[str, dict]]:
    pngs = {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(out.glob("im*.png"))}
    metas = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("im*.json"))}
    return pngs, metas


def _assert_same_meta(a: dict, b: dict) -> None:
    weights = lambda m: [layer.pop("weight") for layer in m["layers"]]  # noqa: E731 - batched GEMMs: float noise
    np.testing.assert_allclose(weights(a), weights(b), rtol=1e-4, atol=1e-6)
    assert a == b


@pytest.mark.parametrize("captions", [False, True], ids=["labels", "captions"])
def test_batched_segment_writes_the_files_of_single_runs(folder, tmp_path, forwards, captions):
    extra = ["--caption-file", str(folder / "captions.json")] if captions else []
    _segment(folder, tmp_path / "one", 1, *extra)
    assert forwards == [1] * 7
    forwards.clear()
    _segment(folder, tmp_path / "four", 4, *extra)
    # batches [im0..im3], [im4..im6] split by size: {0,2,3} + {1}, then {4} + {5} + {6}
    assert forwards == [3, 1, 1, 1, 1]
    pngs_one, metas_one = _outputs(tmp_path / "one")
    pngs_four, metas_four = _outputs(tmp_path / "four")
    assert len(pngs_one) == 14 and pngs_four == pngs_one  # labels + overlay PNGs, pixel for pixel
    assert metas_four.keys() == metas_one.keys()
    for name in metas_one:
        _assert_same_meta(metas_four[name], metas_one[name])
    if captions:  # each image kept its own caption (entities differ per image)
        assert len({m["caption"] for m in metas_one.values()}) == 7
        assert all("floor" in metas_one[f"im{i}.json"]["caption"] for i in (1, 3, 5))


def test_batched_segment_resumes_image_by_image(folder, tmp_path, forwards):
    out = tmp_path / "seg"
    _segment(folder, out, 3)
    before = _outputs(out)
    for stem in ("im2", "im6"):  # as a killed run leaves them: json (written last) missing or no PNG
        (out / f"{stem}.json").unlink()
    (out / "im4_overlay.png").unlink()
    forwards.clear()
    second = _segment(folder, out, 3)
    assert "(4 already done)" in second
    assert sorted(forwards) == [1, 2]  # im2 and im6 share a size and one batch of three; im4 has its own size
    pngs, metas = _outputs(out)
    assert pngs == before[0] and metas.keys() == before[1].keys()


def _eval(folder: Path, out: Path, batch: int, *extra: str) -> dict:
    result = runner.invoke(app, ["eval", "--images", str(folder / "images"), "--voc-labels", str(folder / "labels"),
                                 "--class-names", CLASSES, "--out", str(out), "--num-workers", "0", "--chunk-size", "4",
                                 "--batch-size", str(batch), "--tau-grid", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_batched_eval_gives_the_report_of_single_runs(folder, tmp_path, forwards):
    one = _eval(folder, tmp_path / "one", 1)  # oracle setting: each prompt names the image's own classes
    assert forwards == [1] * 7
    forwards.clear()
    four = _eval(folder, tmp_path / "four", 4)
    assert forwards == [3, 1, 1, 1, 1]  # chunks [im0..im3], [im4..im6], split by size
    assert one["n_images"] == four["n_images"] == 7
    assert four["confusion_matrix"] == one["confusion_matrix"]
    assert four["evaluated_split_tau_grid"] == one["evaluated_split_tau_grid"]
    assert four["miou"] == one["miou"] and four["per_class_iou"] == one["per_class_iou"]
    # a resumed run may use another batch size (it is not a setting of the run): finished chunks are kept
    (tmp_path / "four" / "parts" / "part-00000004-00000007.npz").unlink()
    forwards.clear()
    again = _eval(folder, tmp_path / "four", 2)
    assert forwards == [1, 1, 1] and again["confusion_matrix"] == one["confusion_matrix"]
