"""`segment` / `eval --batch-size N` through the run engine: N images per forward give the output files and the
report of batch 1, with images of mixed sizes and a different class list (and caption) per image; a batched run
resumes image by image (segment) and chunk by chunk (eval).

A batch changes the GEMM shapes, so scores differ from batch 1's by float noise (~1e-6 here), and a pixel whose
decision is a tie within that noise may take the other label: outputs are compared exactly except at such
pixels, which each run's recorded decisions (class maps, background) identify."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from difffeat.cli import app
from difffeat.evaluate.runner import PUBLISHED_TAU_GRID
from difffeat.images import to_rgb
from difffeat.segment.segmenter import Segmenter
from difffeat.shapes import world

from _helpers import assert_labels_differ_only_at_ties, tie_pixels

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


def _key(image) -> str:
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


@pytest.fixture
def decisions(monkeypatch) -> dict:
    """Every decision the runs make, keyed by the image's pixels: ``{key: SegmentationResult}``."""
    made: dict = {}
    stock = Segmenter.decide

    def record(self, obs):
        made[_key(obs.image)] = result = stock(self, obs)
        return result

    monkeypatch.setattr(Segmenter, "decide", record)
    return made


def _decisions_by_stem(folder: Path, made: dict) -> dict:
    return {p.stem: made[_key(to_rgb(p))] for p in sorted((folder / "images").glob("*.png"))}


def _decisions_by_stem_of(folder: Path, made: dict, stems: list[str]) -> dict:
    return {s: made[_key(to_rgb(folder / "images" / f"{s}.png"))] for s in stems}


def _segment(folder: Path, out: Path, batch: int, *extra: str) -> str:
    result = runner.invoke(app, ["segment", str(folder / "images"), "-c", CLASSES, "-o", str(out), "--num-workers", "0",
                                 "--batch-size", str(batch), "--label-file", str(folder / "labels.json"), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _outputs(out: Path) -> tuple[dict[str, bytes], dict[str, dict]]:
    pngs = {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(out.glob("im*.png"))}
    metas = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("im*.json"))}
    return pngs, metas


def _assert_same_outputs(out_a: Path, out_b: Path, made_a: dict, made_b: dict) -> None:
    """Two runs' files are equal, but for labels (and what derives from them) at float-noise ties and for float
    figures (layer weights, class scores) within float noise."""
    pngs_a, metas_a = _outputs(out_a)
    pngs_b, metas_b = _outputs(out_b)
    assert pngs_a.keys() == pngs_b.keys() and metas_a.keys() == metas_b.keys()
    for stem in made_a:
        a, b = made_a[stem], made_b[stem]
        assert_labels_differ_only_at_ties(a, b)
        for out, result in ((out_a, a), (out_b, b)):  # the files hold the decisions
            np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}_labels.png")), result.labels)
        if np.array_equal(a.labels, b.labels):  # everywhere but at ties: the PNGs byte for byte
            assert pngs_a[f"{stem}_overlay.png"] == pngs_b[f"{stem}_overlay.png"]
        meta_a, meta_b = metas_a[f"{stem}.json"], metas_b[f"{stem}.json"]
        for key, rtol, atol in (("layers", 1e-4, 1e-6), ("class_scores", 1e-4, 1e-6)):
            x, y = meta_a.pop(key), meta_b.pop(key)
            if key == "layers":
                assert [l["name"] for l in x] == [l["name"] for l in y]
                x, y = [l["weight"] for l in x], [l["weight"] for l in y]
            else:
                assert x.keys() == y.keys()
                x, y = list(x.values()), list(y.values())
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
        pixels_a, pixels_b = meta_a.pop("pixels_per_class"), meta_b.pop("pixels_per_class")
        assert sum(abs(pixels_a[c] - pixels_b[c]) for c in pixels_a) <= 2 * tie_pixels(a, b)
        assert meta_a == meta_b


@pytest.mark.parametrize("captions", [False, True], ids=["labels", "captions"])
def test_batched_segment_writes_the_files_of_single_runs(folder, tmp_path, forwards, decisions, captions):
    extra = ["--caption-file", str(folder / "captions.json")] if captions else []
    _segment(folder, tmp_path / "one", 1, *extra)
    assert forwards == [1] * 7
    made_one = _decisions_by_stem(folder, decisions)
    forwards.clear()
    decisions.clear()
    _segment(folder, tmp_path / "four", 4, *extra)
    # batches [im0..im3], [im4..im6] split by size: {0,2,3} + {1}, then {4} + {5} + {6}
    assert forwards == [3, 1, 1, 1, 1]
    assert len(_outputs(tmp_path / "one")[0]) == 14  # labels + overlay PNGs
    _assert_same_outputs(tmp_path / "one", tmp_path / "four", made_one, _decisions_by_stem(folder, decisions))
    metas_one = _outputs(tmp_path / "one")[1]
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


def _assert_same_report(a: dict, b: dict, made_a: dict, made_b: dict) -> None:
    """Two reports count for count, unless float noise can flip a label somewhere; then each flip moves one
    count between two cells (checked at the run's tau; a grid tau with possible flips is not compared)."""
    assert a["n_images"] == b["n_images"] == 7
    ties = sum(tie_pixels(made_a[s], made_b[s]) for s in made_a)
    diff = np.abs(np.asarray(a["confusion_matrix"]) - np.asarray(b["confusion_matrix"])).sum()
    assert diff <= 2 * ties, (diff, ties)
    if ties == 0:
        assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]
    for t in PUBLISHED_TAU_GRID:
        shifted = {s: (r.with_tau(t), made_b[s].with_tau(t)) for s, r in made_a.items()}
        if sum(tie_pixels(x, y) for x, y in shifted.values()) == 0:
            key = f"{t:+.2f}"
            assert a["evaluated_split_tau_grid"]["miou_by_tau"][key] == b["evaluated_split_tau_grid"]["miou_by_tau"][key], t


def test_batched_eval_gives_the_report_of_single_runs(folder, tmp_path, forwards, decisions):
    one = _eval(folder, tmp_path / "one", 1)  # oracle setting: each prompt names the image's own classes
    assert forwards == [1] * 7
    made_one = _decisions_by_stem(folder, decisions)
    forwards.clear()
    decisions.clear()
    four = _eval(folder, tmp_path / "four", 4)
    assert forwards == [3, 1, 1, 1, 1]  # chunks [im0..im3], [im4..im6], split by size
    _assert_same_report(one, four, made_one, _decisions_by_stem(folder, decisions))
    # a resumed run may use another batch size (it is not a setting of the run): finished chunks are kept
    made_four = _decisions_by_stem(folder, decisions)
    (tmp_path / "four" / "parts" / "part-00000004-00000007.npz").unlink()
    forwards.clear()
    again = _eval(folder, tmp_path / "four", 2)
    assert forwards == [1, 1, 1]
    made_again = {**made_four, **_decisions_by_stem_of(folder, decisions, ["im4", "im5", "im6"])}
    _assert_same_report(one, again, made_one, made_again)
