"""Evaluation: the confusion matrix against a direct count, COCO/VOC loading, settings, tau tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from difffeat import Segmenter
from difffeat.errors import DifffeatError
from difffeat.evaluate import CocoDataset, ConfusionMatrix, ShapesDataset, VocDataset
from difffeat.runs import evaluate, tune_tau

from _helpers import backbone_for, random_image


def test_confusion_matrix_iou_matches_direct_count():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (30, 30)).astype(np.uint8)
    pred = rng.integers(0, 4, (30, 30)).astype(np.uint8)
    gt[0, :] = 255
    cm = ConfusionMatrix(4)
    cm.update(gt, pred)
    valid = gt != 255
    for c in range(4):
        inter = ((gt == c) & (pred == c) & valid).sum()
        union = (((gt == c) | (pred == c)) & valid).sum()
        assert cm.iou()[c] == pytest.approx(inter / union)
    half = ConfusionMatrix(4)
    half.update(gt[:15], pred[:15])
    other = ConfusionMatrix(4)
    other.update(gt[15:], pred[15:])
    np.testing.assert_array_equal(half.merge(other).counts, cm.counts)

    # the two diagnostics against direct counts over the valid pixels
    g, p = gt[valid], pred[valid]
    assert cm.foreground_iou() == pytest.approx(((g > 0) & (p > 0)).sum() / ((g > 0) | (p > 0)).sum())
    found = (g > 0) & (p > 0)
    assert cm.class_accuracy_on_found() == pytest.approx((g[found] == p[found]).mean())
    assert ConfusionMatrix(3).foreground_iou() != ConfusionMatrix(3).foreground_iou()  # NaN when empty


def _write_coco(tmp_path):
    (tmp_path / "images").mkdir()
    gt = np.zeros((32, 32), np.uint8)
    gt[4:14, 4:14] = 1
    gt[18:30, 10:28] = 2
    random_image(32, 32).save(tmp_path / "images" / "a.png")
    anns = []
    for i, cat in enumerate((1, 2), start=1):
        rle = mask_utils.encode(np.asfortranarray((gt == cat).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": i, "image_id": 1, "category_id": cat * 10, "segmentation": rle, "area": int((gt == cat).sum()),
                     "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}], "annotations": anns,
            "categories": [{"id": 10, "name": "cat"}, {"id": 20, "name": "dog"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return gt


def test_coco_dataset_gives_contiguous_semantic_labels(tmp_path):
    gt = _write_coco(tmp_path)
    data = CocoDataset(tmp_path / "ann.json", tmp_path / "images")
    assert data.classes == ["cat", "dog"]
    np.testing.assert_array_equal(data[0].gt, gt)
    assert data[0].present() == [1, 2]


def test_voc_dataset_reads_label_pngs(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    random_image(16, 16).save(tmp_path / "img" / "x.jpg")
    lab = np.zeros((16, 16), np.uint8)
    lab[2:5, 2:5] = 1
    lab[0, 0] = 255
    Image.fromarray(lab).save(tmp_path / "lab" / "x.png")
    data = VocDataset(tmp_path / "img", tmp_path / "lab", ["cat"])
    np.testing.assert_array_equal(data[0].gt, lab)
    assert data[0].present() == [1]


def test_missing_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(DifffeatError, match="not found"):
        CocoDataset(tmp_path / "nope.json", tmp_path)


def test_evaluate_states_its_setting_and_counts_every_pixel(tiny_pipes, tmp_path):
    _write_coco(tmp_path)
    data = CocoDataset(tmp_path / "ann.json", tmp_path / "images")
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    for setting in ("oracle", "all"):
        report = evaluate(seg, data, setting=setting)
        assert report.setting == setting and report.n_images == 1
        assert np.array(report.extra["confusion_matrix"]).sum() == 32 * 32
        assert set(report.per_class_iou) == {"background", "cat", "dog"}
        assert "oracle" in report.to_json()["setting_description"] or setting == "all"


def test_tune_tau_scores_every_candidate_from_one_forward_each(tiny_pipes):
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    data = ShapesDataset("val", 2)
    best, scores = tune_tau(seg, data, taus=(-0.2, 0.0, 0.2))
    assert set(scores) == {-0.2, 0.0, 0.2} and best in scores
    assert scores[best] == max(scores.values())


# ------------------------------------------------------------------------------------------ linear probe
def test_pixel_probe_learns_a_linearly_decodable_label_and_not_noise() -> None:
    import torch

    from difffeat.errors import DifffeatError
    from difffeat.evaluate import PixelProbe, probe_score

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (6, 8, 8), generator=g)
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])  # class -> feature direction
    feats = centres[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(6, 4, 8, 8, generator=g)
    good = probe_score(feats[:4], labels[:4], feats[4:], labels[4:], num_classes=3, pixels_per_image=64)
    assert good.pixel_accuracy > 0.95 and good.miou > 0.9
    noise = torch.randn(6, 4, 8, 8, generator=g)
    bad = probe_score(noise[:4], labels[:4], noise[4:], labels[4:], num_classes=3, pixels_per_image=64)
    assert bad.pixel_accuracy < 0.6
    probe = PixelProbe(3, pixels_per_image=64).fit(feats[:4], labels[:4])
    pred = probe.predict(feats[4:])
    assert probe.score(feats[4:], labels[4:]).pixel_accuracy == pytest.approx(float((pred == labels[4:]).float().mean()))
    with pytest.raises(DifffeatError, match="same grid"):
        probe.score(feats[4:, :, :4], labels[4:])
    with pytest.raises(DifffeatError, match="not fitted"):
        PixelProbe(3).predict(feats)
    with pytest.raises(DifffeatError, match=r"labels must lie in \[0, 1\]"):
        PixelProbe(2).fit(feats, labels)


class _ThresholdResult:
    """Stands in for a SegmentationResult: one class score map, label 1 where score > tau."""

    def __init__(self, score: np.ndarray) -> None:
        self.score = score

    def with_tau(self, tau: float):
        return type("Decided", (), {"labels": (self.score > tau).astype(np.uint8)})()


def test_tau_sweep_chooses_tau_on_the_tuning_split_and_scores_the_test_split_there():
    from difffeat.evaluate import TauSweep

    ramp = np.linspace(0.0, 1.0, 100).reshape(10, 10)  # score of class 1 at every pixel
    gt_val = (ramp > 0.5).astype(np.uint8) * 3  # dataset label 3 where score > 0.5: val's best tau is 0.5
    gt_test = (ramp > 0.2).astype(np.uint8) * 3  # the test split alone would prefer tau = 0.2
    sweep = TauSweep(n_classes=4, taus=[0.0, 0.2, 0.5, 0.8])
    sweep.update("val", "row", _ThresholdResult(ramp), [3], gt_val)
    sweep.update("test", "row", _ThresholdResult(ramp), [3], gt_test)
    (row,) = sweep.rows()
    assert row["row"] == "row" and row["tau"] == 0.5 and row["tune_miou"] == 1.0
    expected = ConfusionMatrix(4)
    expected.update(gt_test, (ramp > 0.5).astype(np.uint8) * 3)  # scored at val's tau, not at test's best
    assert row["miou"] == pytest.approx(expected.miou()) and row["miou"] < 1.0
    with pytest.raises(ValueError, match="unknown split 'train'"):
        sweep.update("train", "row", _ThresholdResult(ramp), [3], gt_val)
    sweep.update("test", "other", _ThresholdResult(ramp), [3], gt_test)
    with pytest.raises(ValueError, match="row 'other' has no 'val' results"):
        sweep.rows()


def test_labelled_items_skips_images_with_no_class_present():
    from difffeat.evaluate import EvalItem, labelled_items

    gts = [np.zeros((4, 4), np.uint8), np.array([[0, 2], [255, 5]], np.uint8), np.full((2, 2), 255, np.uint8)]

    class Listed:
        classes = ["a", "b", "c", "d", "e"]

        def __len__(self):
            return len(gts)

        def __getitem__(self, i):
            return EvalItem(f"im{i}", Image.new("RGB", gts[i].shape[::-1]), gts[i])

    out = list(labelled_items(Listed()))
    assert [(item.name, labels) for item, labels in out] == [("im1", [2, 5])]  # background and ignore are not classes


def test_tune_tau_scores_equal_an_evaluation_at_each_tau():
    """The tuner decides every tau from one forward per image; each score must equal a separate evaluation
    with the segmenter set to that tau (a different path through the same loop: the segmenter decides)."""
    import difffeat

    seg = Segmenter(difffeat.load("shapes", device="cpu", dtype="fp32"))
    data = ShapesDataset("val", 3)
    taus = (-0.2, 0.1, 0.3)
    best, scores = tune_tau(seg, data, taus=taus)
    for tau in taus:
        at_tau = Segmenter(seg.backbone, seg.settings.update(tau=tau))
        assert evaluate(at_tau, data).miou == pytest.approx(scores[tau], abs=1e-12)
    assert best == max(scores, key=lambda t: (scores[t], -abs(t)))
    assert len(set(scores.values())) > 1  # the candidates really differ, so the choice is tested


def test_image_above_the_pixel_cap_is_scored_on_the_full_size_annotation(tiny_pipes, tmp_path):
    """Segmenter downscales images above MAX_PIXELS; eval brings its labels back to the annotation's grid
    instead of failing on mismatched shapes."""
    from difffeat.images import MAX_PIXELS

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    w, h = 4500, 4000
    assert w * h > MAX_PIXELS
    img = np.zeros((h, w, 3), np.uint8)
    img[:, w // 2 :] = 255
    gt = np.zeros((h, w), np.uint8)
    gt[:, w // 2 :] = 1
    Image.fromarray(img).save(tmp_path / "images" / "big.png", compress_level=1)
    Image.fromarray(gt).save(tmp_path / "labels" / "big.png", compress_level=1)
    seg = Segmenter(backbone_for(tiny_pipes, "sd"))
    with pytest.warns(UserWarning, match="downscal"):
        report = evaluate(seg, VocDataset(tmp_path / "images", tmp_path / "labels", ["cat"]))
    assert report.n_images == 1
    counts = np.array(report.extra["confusion_matrix"])
    assert counts.sum() == w * h  # every annotated pixel was scored


def test_report_json_has_no_nan_token_when_nothing_was_scored():
    import json

    from difffeat.evaluate import build_report

    report = build_report(ConfusionMatrix(3), ["cat", "dog"], "oracle", 0, 0.0, {})
    text = json.dumps(report.to_json())
    assert "NaN" not in text and json.loads(text)["miou"] is None
