"""The six GOCA benchmarks read as published (issue 28): miniatures in the official layouts, compared with an
independent transcription of the published dataset / captioner / metric code; the CLI on each; bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _benchmark_minis as minis
import _goca_published as published
from difffeat import errors
from difffeat.evaluate.benchmarks import BENCHMARKS, BenchmarkCaptions, benchmark_caption, benchmark_spec, open_benchmark
from difffeat.evaluate.metrics import ConfusionMatrix
from difffeat.evaluate.runner import class_keys

NAMES = list(BENCHMARKS)


@pytest.fixture(scope="module")
def minis_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    return {n: minis.write(n, base / n) for n in NAMES}


def _synonyms(name: str) -> list[list[str]]:
    return [[]] + [list(s) for s in benchmark_spec(name).synonyms]


@pytest.mark.parametrize("name", NAMES)
def test_loaded_items_equal_the_published_transcription(name, minis_root):
    root, nouns = minis_root[name]
    data = open_benchmark(name, root)
    images, labels = published.samples(name, str(root))
    assert [Path(p).name for p in images] == [data.entries[i].name for i in range(len(data))]  # split, subset, order
    spec = benchmark_spec(name)
    source = BenchmarkCaptions(nouns, name)
    source.check(data)
    entries = json.loads(Path(nouns).read_text())
    for i, (img_path, lab_path) in enumerate(zip(images, labels)):
        item = data[i]
        assert item.name == Path(img_path).name
        assert np.array_equal(np.asarray(item.image), np.asarray(Image.open(img_path).convert("RGB")))
        gt = published.label(name, str(root), lab_path)
        assert np.array_equal(item.gt, gt)
        present = published.caption_classes(name, img_path, gt)
        assert sorted(item.caption_classes) == sorted(present)
        text, objects, background = published.caption(entries[item.name]["caption"], _synonyms(name), present,
                                                      spec.append_background, spec.append_missing_class)
        prompt = source.prompt(item, data.classes)
        assert prompt.caption == text
        assert prompt.labels == list(objects)  # the classes prompted, in the published order
        assert prompt.class_phrases == list(objects.values())
        assert prompt.entities == background


@pytest.mark.parametrize("name", NAMES)
def test_miou_equals_the_published_metric_and_the_present_average(name, minis_root):
    root, _ = minis_root[name]
    data = open_benchmark(name, root)
    k = len(data.classes) + 1
    rng = np.random.default_rng(0)
    gts, preds = [], []
    cm = ConfusionMatrix(k)
    for i in range(len(data)):
        gt = data[i].gt
        pred = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, k, gt.shape), gt).astype(np.uint8)
        gts.append(gt)
        preds.append(pred)
        cm.update(gt, pred)
    assert cm.miou("published") == pytest.approx(published.miou(gts, preds, k), rel=1e-12)
    ious = []
    for c in range(k):  # present: the classes in ground truth or prediction
        inter = sum(int(((g == c) & (p == c)).sum()) for g, p in zip(gts, preds))
        union = sum(int(((g == c) | (p == c)).sum()) for g, p in zip(gts, preds))
        if union:
            ious.append(inter / union)
    assert cm.miou("present") == pytest.approx(np.mean(ious), rel=1e-12)


def test_miou_averages_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = ConfusionMatrix(4)  # class 3 never occurs
    cm.update(gt, pred)
    # IoU: background 1/3 (I 1, U 3), class 1 2/3 (I 2, U 3), class 2 1/2 (I 1, U 2), class 3 absent
    assert cm.miou("present") == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3, rel=1e-12)
    assert cm.miou("published") == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 0) / 4, rel=1e-7)
    with pytest.raises(ValueError, match="average"):
        cm.miou("mean")


def test_per_class_report_keeps_merged_coco_stuff_slots_apart():
    classes = list(benchmark_spec("coco-stuff").classes)
    keys = class_keys(classes)
    assert len(set(keys)) == len(classes) + 1
    assert keys[3] == "food" and keys[15] == "food (15)" and keys[16] == "furniture (16)"


@pytest.mark.parametrize("name", NAMES)
def test_caption_switches_override_the_published_defaults(name, minis_root):
    root, nouns = minis_root[name]
    data = open_benchmark(name, root)
    spec = benchmark_spec(name)
    entries = json.loads(Path(nouns).read_text())
    flipped = BenchmarkCaptions(nouns, name, not spec.append_background, not spec.append_missing_class)
    assert flipped.spec.endswith(f"background={int(not spec.append_background)};missing={int(not spec.append_missing_class)}")
    for i in range(len(data)):
        item = data[i]
        text, objects, background = published.caption(entries[item.name]["caption"], _synonyms(name), item.caption_classes,
                                                      not spec.append_background, not spec.append_missing_class)
        prompt = flipped.prompt(item, data.classes)
        assert (prompt.caption, prompt.labels, prompt.entities) == (text, list(objects), background)


def test_synonyms_name_classes_only_when_present():
    syn = [["person", "man"], ["car", "vehicle"], ["dog"]]
    cap = benchmark_caption("Man, (vehicle, dog), tree.", syn, [1, 3], True, False)
    # "vehicle" names no present class, so the group holds one class word and stays one phrase
    assert cap.caption == "man, vehicle, dog, tree, background"
    assert cap.labels == [1, 3] and cap.class_phrases == [["man"], ["vehicle, dog"]] and cap.entities == ["tree", "background"]
    cap = benchmark_caption("Man, (vehicle, dog), tree.", syn, [1, 2, 3], False, True)
    assert cap.caption == "man, vehicle, dog, tree" and cap.labels == [1, 2, 3]


_GOCA_REPO = os.environ.get("DIFFFEAT_GOCA_REPO")  # a checkout of Darkbblue/goca (src-main/...)


@pytest.mark.skipif(not _GOCA_REPO, reason="set DIFFFEAT_GOCA_REPO to a checkout of Darkbblue/goca")
def test_data_files_equal_the_published_lists():
    import ast
    import pickle

    src = Path(_GOCA_REPO) / "src-main"
    lists = {}
    for node in ast.walk(ast.parse((src / "components" / "caption_dataset.py").read_text())):
        if isinstance(node, ast.ClassDef):
            for n in ast.walk(node):
                if isinstance(n, ast.Assign) and isinstance(n.value, ast.List):
                    target = n.targets[0]
                    key = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                    if key in ("class_name", "ctx59_class"):
                        lists.setdefault((node.name, key), ast.literal_eval(n.value))
    syn = lambda n: [list(s) for s in benchmark_spec(n).synonyms]  # noqa: E731
    assert syn("voc") == lists[("PascalVOCDataset", "class_name")][1:]
    assert syn("coco-stuff") == lists[("COCODataset", "class_name")][1:]
    assert syn("cityscapes") == lists[("CityDataset", "class_name")][1:]
    assert syn("ade20k") == lists[("ADEDataset", "class_name")][1:]
    assert syn("coco-object") == lists[("COCOObjectDataset", "class_name")][1:]
    ctx, ids = lists[("PascalContextDataset", "class_name")], lists[("PascalContextDataset", "ctx59_class")]
    assert syn("context") == [ctx[i] for i in ids[1:]] and benchmark_spec("context").labels["raw_ids"] == ids[1:]
    with open(src / "fine_to_coarse_dict.pickle", "rb") as f:
        f2c = pickle.load(f)["fine_index_to_coarse_index"]
    assert benchmark_spec("coco-stuff").labels["fine_to_coarse"] == [f2c[k] for k in range(182)]


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    from difffeat.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny") / "sd")


@pytest.mark.parametrize("name", NAMES)
def test_cli_eval_dataset_reports_the_protocol(name, minis_root, tiny_sd_dir, tmp_path):
    from typer.testing import CliRunner

    from difffeat.cli import app

    root, nouns = minis_root[name]
    res = CliRunner().invoke(app, ["eval", "--dataset", name, "--root", str(root), "--caption-file", str(nouns), "--model",
                                   str(tiny_sd_dir), "--out", str(tmp_path / "run"), "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    spec = benchmark_spec(name)
    n = len(open_benchmark(name, root))
    line = next(s for s in res.output.splitlines() if f"{name}: split" in s)
    assert spec.split in line and f"{n} images" in line and "mIoU average published" in line and "resize square" in line
    assert f"append background {'on' if spec.append_background else 'off'}" in line
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    bench = report["benchmark"]
    assert (bench["dataset"], bench["split"], bench["n_images"], bench["miou_average"], bench["resize"]) == (name, spec.split, n, "published", "square")
    assert bench["caption_rules"]["append_missing_class"] == spec.append_missing_class
    assert report["n_images"] == n and report["segment_settings"]["resize"] == "square"
    assert len(report["per_class_iou"]) == len(spec.classes) + 1  # every class, merged slots included
    counts = ConfusionMatrix(len(spec.classes) + 1, np.asarray(report["confusion_matrix"]))
    assert report["miou"] == pytest.approx(counts.miou("published"), rel=1e-12)


def _no_model(monkeypatch):
    import difffeat.backbones

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(difffeat.backbones, "load", fail)


def _bad(tmp_path, name):
    root, nouns = minis.write(name, tmp_path / name)
    return root, nouns


def _case_wrong_root(tmp_path):
    root, _ = _bad(tmp_path, "ade20k")
    return ["--dataset", "cityscapes", "--root", str(root)], errors.DatasetError, "leftImg8bit/val"


def _case_partial_root(tmp_path):
    import shutil

    root, _ = _bad(tmp_path, "cityscapes")
    shutil.rmtree(root / "gtFine")
    return ["--dataset", "cityscapes", "--root", str(root)], errors.DatasetError, "gtFine/val"


def _case_missing_split(tmp_path):
    root, _ = _bad(tmp_path, "voc")
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").unlink()
    return ["--dataset", "voc", "--root", str(root)], errors.DatasetError, "train.txt"


def _case_label_outside_map(tmp_path):
    root, _ = _bad(tmp_path, "cityscapes")
    path = next((root / "gtFine/val/munster").glob("*_labelIds.png"))
    lab = np.asarray(Image.open(path)).copy()
    lab[0, 0] = 40
    Image.fromarray(lab).save(path)
    return ["--dataset", "cityscapes", "--root", str(root)], errors.DatasetError, "[40]"


def _case_panoptic_category_outside_map(tmp_path):
    root, _ = _bad(tmp_path, "coco-object")
    ann = root / "annotations/panoptic_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][1]["segments_info"][0]["category_id"] = 999
    ann.write_text(json.dumps(data))
    return ["--dataset", "coco-object", "--root", str(root)], errors.DatasetError, "999"


def _case_caption_file_of_another_dataset(tmp_path):
    root, _ = _bad(tmp_path, "voc")
    _, city_nouns = _bad(tmp_path, "cityscapes")
    return ["--dataset", "voc", "--root", str(root), "--caption-file", str(city_nouns)], errors.LabelFileError, "cityscapes"


def _case_image_without_label(tmp_path):
    root, _ = _bad(tmp_path, "ade20k")
    (root / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png").unlink()
    return ["--dataset", "ade20k", "--root", str(root)], errors.DatasetError, "ADE_val_00000002"


def _case_unknown_dataset(tmp_path):
    return ["--dataset", "pascal", "--root", str(tmp_path)], errors.InvalidOptionError, "voc, context"


def _case_bad_average(tmp_path):
    root, _ = _bad(tmp_path, "ade20k")
    return ["--dataset", "ade20k", "--root", str(root), "--miou-average", "mean"], errors.InvalidOptionError, "--miou-average"


BAD = [_case_wrong_root, _case_partial_root, _case_missing_split, _case_label_outside_map, _case_panoptic_category_outside_map,
       _case_caption_file_of_another_dataset, _case_image_without_label, _case_unknown_dataset, _case_bad_average]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c.__name__[6:] for c in BAD])
def test_bad_benchmark_input_is_one_line_before_any_model_loads(case, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from difffeat.cli import app
    from difffeat.runs.commands import evaluate_dataset

    args, error, needle = case(tmp_path)
    _no_model(monkeypatch)
    res = CliRunner().invoke(app, ["eval", *args, "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    lines = [s for s in res.output.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output
    opts = dict(zip(args[::2], args[1::2]))
    with pytest.raises(error, match=__import__("re").escape(needle)):
        evaluate_dataset(dataset=opts["--dataset"], root=opts["--root"], caption_file=opts.get("--caption-file"),
                         miou_average=opts.get("--miou-average"), out_dir=tmp_path / "run2")


def test_datasets_command_lists_layout_and_download():
    from typer.testing import CliRunner

    from difffeat.cli import app

    res = CliRunner().invoke(app, ["datasets", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        spec = benchmark_spec(r["name"])
        assert r["download"].startswith("http") and r["layout"] == list(spec.layout) and r["split"] == spec.split


def test_resize_square_feeds_the_model_a_square_and_returns_labels_at_image_size(tiny_pipes):
    import difffeat
    from _helpers import backbone_for, random_image

    backbone = backbone_for(tiny_pipes, "sd")
    image = random_image(48, 96)
    keep = difffeat.Segmenter(backbone, resize="keep")
    square = difffeat.Segmenter(backbone, resize="square")
    _, inputs_keep = keep.prepare(image, ["cat"])
    _, inputs_square = square.prepare(image, ["cat"])
    assert inputs_keep.latents.shape[-1] == 2 * inputs_keep.latents.shape[-2]
    assert inputs_square.latents.shape[-1] == inputs_square.latents.shape[-2]
    assert square(image, ["cat"]).labels.shape == (48, 96)


def test_python_api_equals_the_cli_run(minis_root, tiny_sd_dir, tmp_path):
    from typer.testing import CliRunner

    import difffeat
    from difffeat.cli import app
    from difffeat.runs import evaluate

    root, nouns = minis_root["cityscapes"]
    res = CliRunner().invoke(app, ["eval", "--dataset", "cityscapes", "--root", str(root), "--caption-file", str(nouns),
                                   "--model", str(tiny_sd_dir), "--out", str(tmp_path / "run"), "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    cli = json.loads((tmp_path / "run" / "report.json").read_text())
    seg = difffeat.Segmenter(difffeat.load(str(tiny_sd_dir)), resize="square", background_entities=())
    report = evaluate(seg, difffeat.open_benchmark("cityscapes", root), BenchmarkCaptions(nouns, "cityscapes"),
                      miou_average="published")
    assert report.extra["confusion_matrix"] == cli["confusion_matrix"] and report.miou == cli["miou"]


def test_segment_resize_option_is_checked_before_the_model_and_reaches_the_settings(tmp_path, monkeypatch, tiny_sd_dir):
    from typer.testing import CliRunner

    from _helpers import random_image
    from difffeat.cli import app

    image = tmp_path / "wide.png"
    random_image(24, 48).save(image)
    res = CliRunner().invoke(app, ["segment", str(image), "--classes", "cat", "--model", str(tiny_sd_dir), "--resize", "square",
                                   "--out", str(tmp_path / "o"), "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "o" / "wide.json").read_text())
    assert "square" in json.dumps(meta) and Image.open(tmp_path / "o" / "wide_labels.png").size == (48, 24)
    _no_model(monkeypatch)
    res = CliRunner().invoke(app, ["segment", str(image), "--classes", "cat", "--resize", "stretch", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "--resize" in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.skipif(not _GOCA_REPO, reason="set DIFFFEAT_GOCA_REPO to a checkout of Darkbblue/goca")
@pytest.mark.parametrize("name", NAMES)
def test_captions_of_every_published_noun_list_equal_the_transcription(name):
    """Every GPT noun list the reference ships for the benchmark, with a pseudo-random present-class set
    (the classes its words name, half of them dropped, plus two others): same caption, classes, entities."""
    file = {"cityscapes": "city", "ade20k": "ade"}.get(name, name)
    entries = json.loads((Path(_GOCA_REPO) / "src-main" / "gpt_output" / f"{file}.json").read_text())
    spec = benchmark_spec(name)
    words = {w: c + 1 for c in reversed(range(len(spec.synonyms))) for w in spec.synonyms[c]}
    rng = np.random.default_rng(0)
    for key, value in entries.items():
        nouns = value["caption"]
        named = sorted({words[w.strip()] for w in re.split(r"[(),.]", nouns.lower()) if w.strip() in words})
        present = [c for c in named if rng.random() < 0.5] + [int(c) for c in rng.integers(1, len(spec.classes) + 1, 2)]
        present = list(dict.fromkeys(present))
        for bg, missing in ((spec.append_background, spec.append_missing_class), (True, True)):
            text, objects, background = published.caption(nouns, _synonyms(name), present, bg, missing)
            cap = benchmark_caption(nouns, spec.synonyms, present, bg, missing)
            assert (cap.caption, cap.labels, cap.class_phrases, cap.entities) == (text, list(objects), list(objects.values()), background), key
