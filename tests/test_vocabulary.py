"""Class words checked against what the model knows (difffeat.segment.vocabulary), on the embedded shapes
model (closed vocabulary) and a tiny random SD pipeline (open vocabulary)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import difffeat
from difffeat import Segmenter
from difffeat.errors import InvalidPromptError
from difffeat.resources import package_dir
from difffeat.segment.vocabulary import ClassVocabularyWarning, check_class_words, model_vocabulary

from _helpers import backbone_for, random_image

SHAPES_DIR = package_dir() / "weights" / "shapes"
needs_shapes = pytest.mark.skipif(not (SHAPES_DIR / "model_index.json").is_file(), reason="shapes model not installed")


@pytest.fixture(scope="module")
def shapes():
    return difffeat.load("shapes", device="cpu")


def test_committed_vocabulary_is_what_export_writes_and_each_class_is_one_token():
    from transformers import CLIPTokenizer

    from difffeat.shapes.captions import vocabulary_file
    from difffeat.shapes.world import SHAPE_CLASSES

    assert json.loads((SHAPES_DIR / "vocabulary.json").read_text()) == vocabulary_file()
    tok = CLIPTokenizer.from_pretrained(SHAPES_DIR / "tokenizer")
    for word in SHAPE_CLASSES:  # the words it knows are whole tokens of its own tokenizer
        assert tok.tokenize(word) == [f"{word}</w>"]
    assert len(tok.tokenize("circel")) > 1


@needs_shapes
@pytest.mark.parametrize(
    "given, used, warned",
    [
        ("circel, sqaure", ["circel", "sqaure"], ["did you mean 'circle'", "did you mean 'square'"]),
        ("banana", ["banana"], ["'banana' is not a word this model knows"]),
        ("Circles", ["circle"], []),
        ("SQUARE, Crosses, diamonds", ["square", "cross", "diamond"], []),
        ("red circles", ["red circle"], []),
        ("background", ["background"], ["not one of its classes"]),
        ("circle, star", ["circle", "star"], []),
    ],
)
def test_closed_vocabulary_normalises_and_warns(shapes, given, used, warned):
    check = check_class_words(given, shapes)
    assert check.names == used
    assert len(check.warnings) == len(warned)
    for sentence, expected in zip(check.warnings, warned):
        assert expected in sentence and "circle, square, triangle" in sentence  # names what it knows
    assert check.known == tuple(model_vocabulary(shapes).classes)


@needs_shapes
def test_closed_vocabulary_errors_name_the_models_classes(shapes):
    with pytest.raises(InvalidPromptError) as err:
        check_class_words(" , ", shapes)
    assert "empty class list" in str(err.value) and "circle" in str(err.value) and "--classes" not in str(err.value)
    with pytest.raises(InvalidPromptError, match="all mean"):
        check_class_words("circle, Circles", shapes)


@needs_shapes
def test_drop_unknown_leaves_out_exactly_the_unknown_names_and_says_so(shapes):
    check = check_class_words("Squares, banana, ring, blue, diamond", shapes, drop_unknown=True)
    assert check.names == ["square", "ring", "diamond"] and check.dropped == ["banana", "blue"]
    assert check.renamed == {"Squares": "square"} and len(check.warnings) == 2
    assert check.warnings[0].startswith("left out: 'banana' is not a word this model knows")
    assert check.warnings[1].startswith("left out: 'blue' is a word this model knows but not one of its classes")
    assert check_class_words("square, ring", shapes, drop_unknown=True).dropped == []
    with pytest.raises(InvalidPromptError) as err:
        check_class_words("banana, kiwi", shapes, drop_unknown=True)
    assert "no class left to segment: 'banana', 'kiwi' are not words" in str(err.value) and "circle" in str(err.value)


@needs_shapes
def test_segmenter_uses_the_class_word_and_warns_on_unknown_words(shapes):
    seg = Segmenter(shapes)
    image = random_image(64, 64, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plural = seg(image, ["Circles", "star"])
    canonical = seg(image, ["circle", "star"])
    assert plural.classes == ["circle", "star"]
    np.testing.assert_array_equal(plural.labels, canonical.labels)
    assert not [w for w in caught if issubclass(w.category, ClassVocabularyWarning)]
    with pytest.warns(ClassVocabularyWarning, match="banana"):
        seg(image, ["banana", "star"])


def test_open_vocabulary_keeps_names_and_has_no_word_list(tiny_pipes):
    backbone = backbone_for(tiny_pipes, "sd")
    assert model_vocabulary(backbone) is None
    check = check_class_words(["Cat", "dogs"], backbone)  # CLIP lower-cases itself: nothing to normalise
    assert check.names == ["Cat", "dogs"] and not check.warnings and check.known == ()
    with pytest.raises(InvalidPromptError) as err:
        check_class_words([], backbone)
    assert "cat, dog" in str(err.value)


@needs_shapes
def test_segment_cli_normalises_and_warns(tmp_path):
    from typer.testing import CliRunner

    from difffeat.cli import app

    image = package_dir() / "examples" / "shapes_test_0006.png"  # a cross and a square
    coco = tmp_path / "coco.json"
    with pytest.warns(ClassVocabularyWarning, match="banana"):
        res = CliRunner().invoke(app, ["segment", str(image), "--classes", "Crosses, banana", "-o", str(tmp_path),
                                       "--coco-results", str(coco)])
    assert res.exit_code == 0, res.output
    entries = json.loads(coco.read_text())
    assert 1 in {e["category_id"] for e in entries}  # "Crosses" segmented as the class word "cross", id 1
    assert json.loads((tmp_path / "shapes_test_0006.json").read_text())["classes"] == {"background": 0, "cross": 1, "banana": 2}
