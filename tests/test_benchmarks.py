"""The six GOCA benchmarks read as published (issue 28): miniatures in the official layouts, compared with an
independent transcription of the published dataset / captioner / metric code; the CLI on each; bad input."""

from __future__ import annotations

import json
import os
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
