"""Label and caption sources for eval/segment, void handling, the evaluated-split tau grid (issue 17, item 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difffeat.errors import LabelFileError
from difffeat.evaluate import ShapesDataset, label_source, with_void
from difffeat.runs import evaluate
from difffeat.evaluate.datasets import EvalItem
from difffeat.evaluate.label_sources import CaptionFile, LabelFile, source_spec
from difffeat.segment.captions import published_caption, split_phrases
from difffeat.segment.prompts import FILLER_WORDS, PUBLISHED_FILLER_WORDS, TextSegment, build_layout

from _helpers import backbone_for


class NoForward:
    """A segmenter that fails if anything is segmented: proves errors come before the run."""

    def __call__(self, *a, **k):
        raise AssertionError("a forward ran before the label file was checked")


def _write(tmp_path, data, name="labels.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_label_file_gives_each_image_its_classes(tmp_path):
    data = ShapesDataset("test", 3)
    names = [data.item_keys(i)[0] for i in range(3)]
    path = _write(tmp_path, {names[0]: ["star", "circle"], names[1]: [], names[2]: ["Square"]})
    source = label_source(f"labels={path}")
    source.check(data)
    classes = data.classes
    assert source.prompt(data[0], classes).labels == [classes.index("star") + 1, classes.index("circle") + 1]
    assert source.prompt(data[1], classes).labels == []
    assert source.prompt(data[2], classes).labels == [classes.index("square") + 1]  # case-insensitive
    assert str(path) in source.description and source.spec == f"labels={path}"


@pytest.mark.parametrize(
    "content, match",
    [
        ({"test-000000": ["circle"]}, r"labels\.json'? has no entry for image 'test-000001' nor for 1 other"),
        ({"test-000000": ["circle"], "test-000001": ["hexagon"], "test-000002": []}, r"entry 'test-000001': names 'hexagon', which is not a class"),
        ({"test-000000": "circle"}, r"entry 'test-000000': must be a list of class names"),
        ('{"test-000000": ["circle"],\n "test-000001": [}', r"not valid JSON: .* line 2, column"),
        ('["circle"]', r"must hold a JSON object"),
    ],
    ids=["missing image", "unknown class", "entry not a list", "malformed JSON", "not an object"],
)
def test_bad_label_file_is_a_clear_error_naming_file_and_entry_before_any_forward(tmp_path, content, match):
    path = _write(tmp_path, content)
    with pytest.raises(LabelFileError, match=match) as info:
        evaluate(NoForward(), ShapesDataset("test", 3), setting=f"labels={path}")
    assert str(path) in str(info.value)


def test_cli_eval_with_a_bad_label_file_fails_cleanly(tmp_path):
    from typer.testing import CliRunner

    from difffeat.cli import app

    path = _write(tmp_path, {"test-000000": ["circle"]})
    res = CliRunner().invoke(app, ["eval", "--shapes-split", "test", "--n", "2", "--label-file", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code != 0 and "no entry for image 'test-000001'" in res.output and "Traceback" not in res.output


def test_label_file_naming_every_class_equals_the_all_setting(tmp_path):
    from difffeat import Segmenter

    data = ShapesDataset("test", 3)
    path = _write(tmp_path, {data.item_keys(i)[0]: list(data.classes) for i in range(3)})
    seg = Segmenter("shapes")
    by_file = evaluate(seg, data, setting=f"labels={path}")
    assert by_file.extra["confusion_matrix"] == evaluate(seg, data, setting="all").extra["confusion_matrix"]
    assert by_file.to_json()["setting"] == f"labels={path}" and "label file" in by_file.to_json()["setting_description"]


def test_published_caption_rules():
    plan = published_caption("Aeroplane, (person, clothes), mountains, sky, sky.", ["aeroplane", "person", "car"])
    assert plan.caption == "aeroplane, person, clothes, mountains, sky, background, car"  # missing class appended
    assert plan.class_phrases == [["aeroplane"], ["person, clothes"], ["car"]]  # a closure is its object's phrase
    assert plan.entities == ["mountains", "sky", "background"]
    split = published_caption("(horse, person, clothes), snow", ["horse", "person"])  # two classes in a closure
    assert split.caption == "horse, person, snow, background" and split.class_phrases == [["horse"], ["person"]]
    assert split_phrases("a, (b, c), d") == ["a", "(b, c)", "d"]


def test_caption_file_prompt_uses_oracle_classes_and_published_caption(tmp_path):
    data = ShapesDataset("test", 2)
    item = data[0]
    present = [data.classes[l - 1] for l in item.present()]
    path = _write(tmp_path, {data.item_keys(0)[0]: {"caption": "Grass, sky."}, data.item_keys(1)[0]: ["cloud"]}, "captions.json")
    source = label_source(source_spec("oracle", None, path))
    assert isinstance(source, CaptionFile) and source.spec == f"captions={path};oracle"
    source.check(data)
    prompt = source.prompt(item, data.classes)
    assert prompt.labels == item.present()
    assert prompt.caption == ", ".join(["grass", "sky", "background"] + present)
    assert prompt.entities == ["grass", "sky", "background"] and prompt.class_phrases == [[c] for c in present]
    with_labels = label_source(source_spec("oracle", _write(tmp_path, {data.item_keys(0)[0]: ["star"], data.item_keys(1)[0]: []}), path))
    with_labels.check(data)
    assert with_labels.prompt(item, data.classes).labels == [data.classes.index("star") + 1]


def test_class_phrases_and_published_filler_words_change_the_tokens(tiny_pipes):
    segments = backbone_for(tiny_pipes, "sd").text_segments()
    caption = "person, clothes, glass of water, background"
    plain = build_layout(["person"], segments, entities=["glass of water", "background"], caption=caption, filler=FILLER_WORDS)
    phrased = build_layout(["person"], segments, entities=["glass of water", "background"], caption=caption,
                           class_phrases=[["person, clothes"]], filler=FILLER_WORDS)  # fmt: skip
    assert set(plain.class_tokens[0]) < set(phrased.class_tokens[0])  # "clothes" now belongs to person
    published = build_layout(["person"], segments, entities=["glass of water", "background"], caption=caption,
                             filler=PUBLISHED_FILLER_WORDS)  # fmt: skip
    assert len(published.entity_tokens[0]) == len(plain.entity_tokens[0]) + 1  # "of" is content in the published list
    assert "of" in FILLER_WORDS and "of" not in PUBLISHED_FILLER_WORDS


class _TinySet:
    classes = ["thing"]

    def __len__(self):
        return 1

    def __getitem__(self, i):
        gt = np.array([[0, 1], [255, 1]], np.uint8)
        return EvalItem("x", None, gt)


def test_void_pixels_ignored_or_counted_as_background():
    from difffeat.evaluate import ConfusionMatrix

    pred = np.array([[0, 1], [1, 1]], np.uint8)  # the void pixel predicted as the class
    counts = {}
    for void in ("ignore", "background"):
        cm = ConfusionMatrix(2)
        cm.update(with_void(_TinySet(), void)[0].gt, pred)
        counts[void] = cm.counts.tolist()
    assert counts["ignore"] == [[1, 0], [0, 2]]
    assert counts["background"] == [[1, 1], [0, 2]]  # published: the void pixel is background, predicted wrong
    with pytest.raises(Exception, match="void='zero' is not one of"):
        with_void(_TinySet(), "zero")


def test_eval_tau_grid_on_the_evaluated_split_is_labelled_and_agrees_at_the_fixed_tau(tmp_path):
    from typer.testing import CliRunner

    from difffeat.cli import app

    report = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--shapes-split", "test", "--n", "3", "--tau", "0.1", "--tau-grid", "--void", "background",
                                   "--report", str(report), "--out", str(tmp_path / "run"), "--num-workers", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    d = json.loads(report.read_text())
    grid = d["evaluated_split_tau_grid"]
    assert "ON THE EVALUATED SPLIT" in grid["note"] and len(grid["miou_by_tau"]) == 9
    assert grid["miou_by_tau"]["+0.10"] == pytest.approx(d["miou"])  # same decision, counted twice
    assert grid["best_miou_on_evaluated_split"] == max(grid["miou_by_tau"].values())
    assert "published-style" in res.output and d["dataset"]["void"] == "background"


def test_segment_cli_with_a_label_file(tmp_path):
    from typer.testing import CliRunner

    from difffeat.cli import app
    from difffeat.resources import package_dir

    image = package_dir() / "examples" / "shapes_test_0001.png"
    labels = _write(tmp_path, {"shapes_test_0001.png": ["star"]})
    res = CliRunner().invoke(app, ["segment", str(image), "--classes", "circle,star", "--label-file", str(labels), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "shapes_test_0001.json").read_text())["classes"] == {"background": 0, "star": 1}
    bad = _write(tmp_path, {"other.png": ["star"]}, "bad.json")
    res = CliRunner().invoke(app, ["segment", str(image), "--classes", "circle,star", "--label-file", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no entry for image 'shapes_test_0001.png'" in res.output
