"""Label-scarce segmentation: the protocol equals a transcription of the published code
(Darkbblue/generic-diffusion-feature scarce_segmentation/), features stream, a ddpm-segmentation tree runs
through the CLI, and bad labels fail before the model loads."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from difffeat.cli import app
from difffeat.evaluate.pixel_ensemble import (
    EarlyStop, PixelEnsemble, PixelMLP, ScarceProtocol, class_ious, drop_small_annotations, iou_counts, shuffle_split, vote,
)
from difffeat.evaluate.scarce_data import LabelledImage, LabelledSet
from difffeat.evaluate.pixels import pixel_features
from difffeat.runs.scarce import _batches, _Cached
from difffeat.runs.scarce import _train_model as TRAIN_MODEL

runner = CliRunner()


# ---------------------------------------------------------------- transcriptions of the reference's operations
def ref_predict_labels(logits_per_model, size):
    """predict_labels: per model argmax of log_softmax, reshaped; the ensemble's torch.mode over models."""
    seg_mode_ensemble = []
    for preds in logits_per_model:
        img_seg = torch.max(torch.log_softmax(preds, dim=1), dim=1)[1]
        seg_mode_ensemble.append(img_seg.reshape(*size))
    img_seg_final = torch.stack(seg_mode_ensemble, dim=-1)
    return torch.mode(img_seg_final, 2)[0]


def ref_compute_iou(preds, gts, number_class, ignore_label=255):
    unions, intersections = Counter(), Counter()
    for pred, gt in zip(preds, gts):
        for target_num in range(number_class):
            if target_num == ignore_label:
                continue
            preds_tmp = (pred == target_num).astype(int)
            gts_tmp = (gt == target_num).astype(int)
            unions[target_num] += (preds_tmp | gts_tmp).sum()
            intersections[target_num] += (preds_tmp & gts_tmp).sum()
    ious = [intersections[c] / (1e-8 + unions[c]) for c in range(number_class) if c != ignore_label]
    return np.array(ious).mean()


def ref_prepare_labels(labels, number_class, ignore_label=255):
    """prepare_data's label handling: small annotations (0 < count < 20) become ignore, then ignore pixels drop."""
    ys = []
    for label in labels:
        label = label.copy()
        for target in range(number_class):
            if target == ignore_label:
                continue
            if 0 < (label == target).sum() < 20:
                label[label == target] = ignore_label
        ys.append(label)
    y = np.stack(ys).flatten()
    return y, y != ignore_label


def ref_shuffle_split(n_train, n_test, seed):
    random.seed(seed)  # setup_seed
    train = [("train", i) for i in range(n_train)]
    test = [("test", i) for i in range(n_test)]
    shuffled = train + test
    random.shuffle(shuffled)
    return shuffled[:n_train], shuffled[n_train:]


def ref_stop_iteration(losses_per_epoch):
    """The training loop's stopping logic: (epoch, batch) at which it breaks, or None."""
    break_count, best_loss = 0, 10000000
    for epoch, losses in enumerate(losses_per_epoch):
        for i, loss in enumerate(losses):
            if epoch > 3:
                if loss < best_loss:
                    best_loss, break_count = loss, 0
                else:
                    break_count += 1
                if break_count > 50:
                    return epoch, i
    return None


# ---------------------------------------------------------------- protocol vs transcription
def test_ensemble_vote_equals_the_reference_mode_of_argmaxes():
    g = torch.Generator().manual_seed(0)
    # 5 models, 6 classes, 12x10 pixels; few classes so that votes tie often
    logits = [torch.randn(120, 6, generator=g) for _ in range(5)]
    logits += [logits[0].clone(), logits[1].clone()]  # make ties and repeated votes likely
    ours = vote(logits).reshape(12, 10)
    assert torch.equal(ours, ref_predict_labels(logits, (12, 10)))


def test_iou_equals_the_reference_with_void_counted_as_the_reference_counts_it():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 5, (9, 7)) for _ in range(4)]
    gts = [rng.integers(0, 5, (9, 7)) for _ in range(4)]
    for g in gts:
        g[rng.random(g.shape) < 0.2] = 255
    inter, union = np.zeros(6), np.zeros(6)
    for p, g in zip(preds, gts):
        a, b = iou_counts(p, g, 6, void_in_eval="reference")  # class 5 absent everywhere: IoU 0, as the reference
        inter, union = inter + a, union + b
    assert class_ious(inter, union).mean() == pytest.approx(ref_compute_iou(preds, gts, 6), rel=1e-12)


def test_ignore_mode_equals_the_reference_on_labels_without_void_pixels():
    rng = np.random.default_rng(2)
    preds = [rng.integers(0, 4, (8, 8)) for _ in range(3)]
    gts = [rng.integers(0, 4, (8, 8)) for _ in range(3)]
    masked = [np.where(rng.random(g.shape) < 0.3, 255, g) for g in gts]
    inter, union = np.zeros(4), np.zeros(4)
    for p, g in zip(preds, masked):
        a, b = iou_counts(p, g, 4, void_in_eval="ignore")
        inter, union = inter + a, union + b
    keep = [g != 255 for g in masked]  # the reference on only the labelled pixels
    want = ref_compute_iou([p[k] for p, k in zip(preds, keep)], [g[k] for g, k in zip(masked, keep)], 4)
    assert class_ious(inter, union).mean() == pytest.approx(want, rel=1e-12)


def test_training_labels_drop_small_annotations_and_void_as_the_reference():
    rng = np.random.default_rng(3)
    labels = []
    for _ in range(3):
        lab = rng.integers(0, 3, (16, 16)).astype(np.uint8)
        lab[:2, :3] = 7  # a 6-pixel class: dropped
        lab[5, 5] = 255
        labels.append(lab)
    y_ref, keep_ref = ref_prepare_labels(labels, 8)
    ours = np.stack([drop_small_annotations(lab, 8, 20) for lab in labels]).flatten()
    assert np.array_equal(ours, y_ref)
    assert np.array_equal(ours != 255, keep_ref) and (ours == 7).sum() == 0


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_random_splits_equal_the_reference_shuffle(seed):
    tr, te = shuffle_split(7, 11, seed)
    rtr, rte = ref_shuffle_split(7, 11, seed)
    index = lambda pairs: [i if part == "train" else 7 + i for part, i in pairs]  # noqa: E731
    assert tr == index(rtr) and te == index(rte)


def test_each_split_of_a_run_is_the_reference_shuffle_with_its_own_seed():
    from difffeat.runs.scarce import split_indices

    p = ScarceProtocol(splits=3, seed=5)
    splits = [split_indices(10, 6, s, p) for s in range(3)]
    index = lambda pairs: [i if part == "train" else 6 + i for part, i in pairs]  # noqa: E731
    assert [s[0] for s in splits] == [index(ref_shuffle_split(6, 4, 5 + s)[0]) for s in range(3)]
    assert [s[1] for s in splits] == [index(ref_shuffle_split(6, 4, 5 + s)[1]) for s in range(3)]
    assert len({tuple(s[0]) for s in splits}) == 3  # the re-splits differ


def test_early_stop_breaks_where_the_reference_loop_breaks():
    rng = np.random.default_rng(4)
    epochs = [list(rng.random(40)) for _ in range(4)] + [list(1.0 - 0.001 * np.arange(10)) + list(rng.random(80) + 1)]
    want = ref_stop_iteration(epochs)
    stop, got = EarlyStop(50, 4), None
    for e, losses in enumerate(epochs):
        for i, loss in enumerate(losses):
            if stop.update(e, loss):
                got = (e, i)
                break
        if got:
            break
    assert got == want and want is not None


def test_classifier_has_the_published_sizes_and_init():
    small, large = PixelMLP(40, 21), PixelMLP(40, 30)
    assert [m.out_features for m in small.layers if isinstance(m, torch.nn.Linear)] == [128, 32, 21]
    assert [m.out_features for m in large.layers if isinstance(m, torch.nn.Linear)] == [256, 128, 30]
    small.init_weights(torch.Generator().manual_seed(0))
    w = torch.cat([m.weight.detach().flatten() for m in small.layers if isinstance(m, torch.nn.Linear)])
    assert abs(float(w.std()) - 0.02) < 0.002 and all(float(m.bias.detach().abs().max()) == 0 for m in small.layers if isinstance(m, torch.nn.Linear))


# ---------------------------------------------------------------- streaming
def test_pixel_features_equal_bilinear_upsampling_read_at_the_pixels():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, 4, 5, generator=g), torch.randn(2, 8, 10, generator=g), torch.randn(1, 13, 17, generator=g)]
    grid = (13, 17)
    full = torch.cat([F.interpolate(m[None], grid, mode="bilinear", align_corners=False)[0] for m in maps])  # [C, H, W]
    idx = torch.randperm(13 * 17, generator=g)[:50]
    got = pixel_features(maps, idx, grid)
    assert torch.allclose(got, full.reshape(full.shape[0], -1)[:, idx].T, atol=1e-5)


def test_an_epoch_streams_every_labelled_pixel_once_whatever_the_pool(tmp_path):
    from difffeat.io import save_features

    g = torch.Generator().manual_seed(1)
    items, labels, want = [], [], []
    for i in range(5):
        save_features(tmp_path / f"im{i}.safetensors", {"a": torch.randn(2, 4, 4, generator=g), "b": torch.randn(1, 8, 8, generator=g)})
        lab = np.random.default_rng(i).integers(0, 3, (8, 8)).astype(np.uint8)
        lab[0, :4] = 255
        labels.append(lab)
        items.append(LabelledImage(f"im{i}", "", ""))
    data = LabelledSet(items, 5, 3, {})
    cache = _Cached(tmp_path, ["a", "b"])
    for i in range(5):
        full = torch.cat([F.interpolate(m[None], (8, 8), mode="bilinear", align_corners=False)[0] for m in cache.maps(f"im{i}")])
        keep = labels[i].ravel() != 255
        want.append(torch.cat([full.reshape(3, -1).T[torch.from_numpy(keep)], torch.from_numpy(labels[i].ravel()[keep]).float()[:, None]], 1))
    want = torch.cat(want)
    for pool in (1, 2, 16):
        p = ScarceProtocol(batch_size=7, pool=pool)
        got = torch.cat([torch.cat([x, y.float()[:, None]], 1) for x, y in _batches(cache, data, range(5), labels, p, torch.Generator().manual_seed(0))])
        assert len(got) == (len(want) // 7) * 7  # only the last incomplete batch is dropped
        dist, match = torch.cdist(got, want, compute_mode="donot_use_mm_for_euclid_dist").min(1)
        assert float(dist.max()) < 1e-5 and len(set(match.tolist())) == len(got)  # each a distinct labelled pixel


# ---------------------------------------------------------------- whole runs
def _ddpm_tree(root, n_train=3, n_test=3, classes=3, bad=None):
    from difffeat.shapes import world

    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / "real" / split
        folder.mkdir(parents=True)
        for i in range(n):
            s = world.sample(split if split == "train" else "test", i)
            s.image.save(folder / f"{i}.png")
            lab = np.minimum(s.mask, classes - 1).astype(np.uint8)
            lab[:2] = 255
            if bad is not None and split == "test" and i == 0:
                lab[10, 10] = bad
            np.save(folder / f"{i}.npy", lab)
    return root


def test_a_miniature_ddpm_segmentation_tree_evaluates_through_the_cli(tmp_path):
    root = _ddpm_tree(tmp_path / "mini")
    out = tmp_path / "out"
    res = runner.invoke(app, ["probe", "shapes", "--ddpm", str(root), "--num-classes", "3", "--preset", "shapes-practical",
                              "--out", str(out), "--splits", "2", "--models", "2", "--epochs", "1", "--label-size", "32",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["miou_per_split"]) == 2 and 0 <= rep["miou_mean"] <= 1
    assert rep["miou_mean"] == pytest.approx(np.mean(rep["miou_per_split"]))
    assert rep["n_train"] == 3 and rep["n_test"] == 3 and rep["splits"][0] != rep["splits"][1]
    assert sorted(p.name for p in (out / "features").glob("*.safetensors")) == sorted(f"{s}-{i}.safetensors" for s in ("train", "test") for i in range(3))
    ens = PixelEnsemble.load(out / "classifier.safetensors")
    assert len(ens.models) == 2 and ens.num_classes == 3 and ens.info["label_size"] == 32
    res = runner.invoke(app, ["probe-predict", str(out / "classifier.safetensors"), str(root / "real" / "test"),
                              "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    maps = [np.asarray(Image.open(tmp_path / "pred" / f"{i}_labels.png")) for i in range(3)]
    assert all(m.shape == (32, 32) and m.max() < 3 for m in maps)


def test_the_saved_classifier_predicts_new_images_like_the_run_scored_them(tmp_path):
    import difffeat
    from difffeat.runs.scarce import ProbeJob, predict_label_maps, run_probe
    from difffeat.evaluate.scarce_data import ddpm_segmentation

    root = _ddpm_tree(tmp_path / "mini")
    fx = difffeat.FeatureExtractor(difffeat.load("shapes", device="cpu"), preset="shapes-practical")
    data = ddpm_segmentation(root, 3)
    rep = run_probe(fx, data, ProbeJob(tmp_path / "out", ScarceProtocol(models=2, epochs=1, splits=1, label_size=64), progress=False))
    ens = PixelEnsemble.load(rep.classifier)
    test_items = [it for it in data.items if it.stem in rep.splits[0]["test"]]
    preds = predict_label_maps(fx, ens, [it.image for it in test_items])
    from difffeat.evaluate.scarce_data import read_label

    inter, union = np.zeros(3), np.zeros(3)
    for p, it in zip(preds, test_items):
        a, b = iou_counts(p, read_label(it.label), 3)
        inter, union = inter + a, union + b
    assert class_ious(inter, union).mean() == pytest.approx(rep.miou_mean, abs=1e-9)


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


def _counting_trainer(monkeypatch, fail_after=None):
    """Wrap run_probe's classifier training: count the calls; raise on call ``fail_after + 1`` (a killed run)."""
    import difffeat.runs.scarce as scarce

    calls = []
    real = TRAIN_MODEL

    def train(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed
        calls.append(args[6])  # the classifier's seed
        return real(*args, **kwargs)

    monkeypatch.setattr(scarce, "_train_model", train)
    return calls


def test_a_killed_probe_resumes_and_reports_what_an_uninterrupted_run_reports(tmp_path, monkeypatch):
    import difffeat
    from difffeat.evaluate.scarce_data import ddpm_segmentation
    from difffeat.runs.scarce import ProbeJob, run_probe

    data = ddpm_segmentation(_ddpm_tree(tmp_path / "mini"), 3)
    fx = difffeat.FeatureExtractor(difffeat.load("shapes", device="cpu"), preset="shapes-practical")
    proto = ScarceProtocol(models=2, epochs=1, splits=2, label_size=32)
    whole = run_probe(fx, data, ProbeJob(tmp_path / "whole", proto, progress=False))
    calls = _counting_trainer(monkeypatch, fail_after=3)
    with pytest.raises(Killed):
        run_probe(fx, data, ProbeJob(tmp_path / "killed", proto, progress=False))
    assert len(calls) == 3 and not (tmp_path / "killed" / "report.json").exists()
    calls = _counting_trainer(monkeypatch)
    resumed = run_probe(fx, data, ProbeJob(tmp_path / "killed", proto, progress=False))
    assert len(calls) == 1  # only the fourth classifier is trained; three are read back
    assert resumed.miou_per_split == whole.miou_per_split and resumed.class_iou_mean == whole.class_iou_mean


def test_only_the_images_a_split_uses_are_extracted(tmp_path):
    import difffeat
    from difffeat.evaluate.scarce_data import ddpm_segmentation
    from difffeat.runs.scarce import ProbeJob, run_probe, split_indices

    data = ddpm_segmentation(_ddpm_tree(tmp_path / "mini"), 3)
    fx = difffeat.FeatureExtractor(difffeat.load("shapes", device="cpu"), preset="shapes-practical")
    proto = ScarceProtocol(models=1, epochs=1, splits=1, label_size=32)
    rep = run_probe(fx, data, ProbeJob(tmp_path / "out", proto, train_count=2, test_count=1, progress=False))
    train, test = split_indices(len(data), data.n_train, 0, proto, 2, 1)
    want = sorted(data.items[i].stem for i in (*train, *test))
    assert sorted(p.stem for p in (tmp_path / "out" / "features").glob("*.safetensors")) == want
    assert sorted(rep.splits[0]["train"] + rep.splits[0]["test"]) == want


def test_stored_classifiers_of_other_settings_are_retrained(tmp_path, monkeypatch):
    import difffeat
    from difffeat.evaluate.scarce_data import ddpm_segmentation
    from difffeat.runs.scarce import ProbeJob, run_probe

    data = ddpm_segmentation(_ddpm_tree(tmp_path / "mini"), 3)
    fx = difffeat.FeatureExtractor(difffeat.load("shapes", device="cpu"), preset="shapes-practical")
    run_probe(fx, data, ProbeJob(tmp_path / "out", ScarceProtocol(models=2, epochs=1, splits=1, label_size=32), progress=False))
    calls = _counting_trainer(monkeypatch)
    run_probe(fx, data, ProbeJob(tmp_path / "out", ScarceProtocol(models=3, epochs=1, splits=1, label_size=32), progress=False))
    assert len(calls) == 1  # more models: the two stored ones are reused
    calls = _counting_trainer(monkeypatch)
    run_probe(fx, data, ProbeJob(tmp_path / "out", ScarceProtocol(models=2, epochs=2, splits=1, label_size=32), progress=False))
    assert len(calls) == 2  # other epochs: both retrained
    calls = _counting_trainer(monkeypatch)
    run_probe(fx, data, ProbeJob(tmp_path / "out", ScarceProtocol(models=2, epochs=2, splits=1, label_size=32), progress=False,
                                 train_count=2))
    assert len(calls) == 2  # other training images: retrained


def test_a_label_outside_the_class_count_fails_before_the_model_loads(tmp_path):
    root = _ddpm_tree(tmp_path / "mini", bad=7)
    res = runner.invoke(app, ["probe", "no/such-model", "--ddpm", str(root), "--num-classes", "3", "--preset",
                              "shapes-practical", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "holds class value(s) [7]" in res.output and "3 classes" in res.output and len(res.output.strip().splitlines()) == 1


def test_void_labels_are_accepted_whatever_the_class_count(tmp_path):
    from difffeat.evaluate.scarce_data import ddpm_segmentation

    data = ddpm_segmentation(_ddpm_tree(tmp_path / "mini"), 3)
    assert len(data) == 6 and data.n_train == 3


def test_the_linear_pixel_probe_ignores_255_labels_in_fitting_and_scoring():
    from difffeat.evaluate import PixelProbe

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (4, 8, 8), generator=g)
    x = F.one_hot(y, 3).permute(0, 3, 1, 2).float() + 0.05 * torch.randn(4, 3, 8, 8, generator=g)
    y_void = y.clone()
    y_void[:, :2] = 255  # the top rows are unlabelled
    x_void = x.clone()
    x_void[:, :, :2] = -x_void[:, :, :2]  # and their features say the opposite: they must not train the probe
    probe = PixelProbe(3, pixels_per_image=64).fit(x_void, y_void)
    score = probe.score(x_void, y_void)
    assert score.pixel_accuracy == 1.0 and score.miou == 1.0  # only labelled pixels count
    unlabelled_acc = (probe.predict(x_void)[:, :2] == y[:, :2]).float().mean()
    assert unlabelled_acc < 0.5  # the flipped features would have been learned had 255 pixels trained it
