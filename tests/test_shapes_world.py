"""The shapes world: determinism, mask/caption consistency, disjoint splits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from difffeat.shapes.captions import list_prompt, random_prompt, vocabulary
from difffeat.shapes.world import (
    CLASS_TO_INDEX,
    COLOURS,
    MIN_VISIBLE_PX,
    SHAPE_CLASSES,
    SPLITS,
    sample,
    split_seed,
)


def test_class_order_is_fixed() -> None:
    assert SHAPE_CLASSES == ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
    assert CLASS_TO_INDEX["circle"] == 1 and CLASS_TO_INDEX["diamond"] == 8


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_deterministic_by_seed(split: str) -> None:
    a, b = sample(split, 7), sample(split, 7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.mask, b.mask)
    assert a.caption == b.caption
    c = sample(split, 8)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_splits_disjoint() -> None:
    seeds = {s: {split_seed(s, i) for i in (0, 1, 99_999_999)} for s in SPLITS}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    assert sample("train", 3).caption != sample("test", 3).caption or not np.array_equal(
        sample("train", 3).mask, sample("test", 3).mask
    )
    with pytest.raises(ValueError):
        sample("nope", 0)


def _caption_classes(caption: str) -> set[str]:
    words = re.findall(r"[a-z]+", caption)
    return {w for w in words if w in SHAPE_CLASSES}


@pytest.mark.parametrize("split", ["train", "test"])
def test_mask_caption_consistency(split: str) -> None:
    for i in range(60):
        s = sample(split, i)
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        assert s.mask.shape == (64, 64) and s.mask.dtype == np.uint8
        in_mask = {SHAPE_CLASSES[k - 1] for k in np.unique(s.mask) if k > 0}
        assert _caption_classes(s.caption) == in_mask == set(s.classes_present)
        assert list(s.classes_present) == sorted(s.classes_present)
        assert 1 <= len(s.instances) <= 4
        union = np.zeros_like(s.mask, dtype=bool)
        for inst in s.instances:
            assert inst.area >= MIN_VISIBLE_PX
            assert inst.colour in COLOURS and inst.colour in s.caption
            assert np.all(s.mask[inst.mask] == inst.class_index)  # the mask reflects visibility
            assert not (union & inst.mask).any()  # visible instance masks never overlap
            union |= inst.mask
            x, y, w, h = inst.bbox
            ys, xs = np.nonzero(inst.mask)
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert np.array_equal(union, s.mask > 0)


def test_object_colour_matches_pixels() -> None:
    s = sample("val", 5)
    img = np.asarray(s.image)
    for inst in s.instances:
        assert np.all(img[inst.mask] == np.asarray(COLOURS[inst.colour]))


def test_generation_is_fast() -> None:
    import time

    t0 = time.perf_counter()
    for i in range(50):
        sample("train", i)
    assert (time.perf_counter() - t0) / 50 < 0.05  # a few ms per sample, generous for loaded machines


def test_prompt_variants_use_vocabulary() -> None:
    vocab = set(vocabulary())
    s = sample("train", 2)
    rng = np.random.default_rng(0)
    objs = [(i.class_name, i.colour) for i in s.instances]
    prompts = {random_prompt(objs, s.background, s.background_colour, rng) for _ in range(200)}
    assert "" in prompts and s.caption in prompts and len(prompts) > 10
    for p in prompts:
        assert set(re.findall(r"[a-z]+|,", p)) <= vocab, p
        assert _caption_classes(p) <= set(s.classes_present)
    assert list_prompt(["circle", "star"]) == "a photo of circle, star"


def test_bundled_examples_are_the_held_out_scenes_they_claim_to_be(tmp_path) -> None:
    from PIL import Image

    from difffeat.shapes.examples import read_examples, write_examples

    written = write_examples(tmp_path, indices=(1, 3))
    read = read_examples(tmp_path)
    assert [e["file"] for e in read] == [e["file"] for e in written]
    for entry in read:
        scene = sample(entry["split"], entry["index"])
        assert np.array_equal(np.asarray(Image.open(entry["path"])), np.asarray(scene.image))
        assert np.array_equal(np.asarray(Image.open(entry["mask_path"])), scene.mask)
    shipped = read_examples()  # the package's own folder
    assert shipped and all(e["path"].is_file() and e["mask_path"].is_file() for e in shipped)
