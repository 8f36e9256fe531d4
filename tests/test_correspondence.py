"""Semantic correspondence: matching and PCK equal a transcription of the published code
(Darkbblue/generic-diffusion-feature correspondence/, nearest-neighbour path), a miniature SPair-71k tree
evaluates through the CLI, multi-seed averaging, and bad pairs fail before the model loads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from difffeat.cli import app
from difffeat.evaluate.correspondence import PckTally, nn_correspondences, pck_hits, rescale_points
from difffeat.evaluate.spair import KeypointPair
from difffeat.runs.correspond import match_pair

runner = CliRunner()


# ---------------------------------------------------------------- transcription of the reference's operations
def ref_rescale_points(points, old_shape, new_shape):
    x_scale = new_shape[0] / old_shape[0]
    y_scale = new_shape[1] / old_shape[1]
    return np.multiply(points, np.array([y_scale, x_scale]))


def ref_points_to_idxs(points, load_size):
    points_y = np.clip(points[:, 0], 0, load_size[1] - 1)
    points_x = np.clip(points[:, 1], 0, load_size[0] - 1)
    return load_size[1] * np.round(points_y) + np.round(points_x)


def ref_flatten(feats):
    b, c, w, h = feats.shape
    return feats.view((b, c, -1)).permute((0, 2, 1))


def ref_normalize(feats):
    return feats / torch.linalg.norm(feats, dim=-1)[:, :, None]


def ref_find_nn_source_correspondences(img1_feats, img2_feats, source_points, load_size):
    img1_feats = torch.nn.functional.interpolate(img1_feats, load_size, mode="bilinear")
    img2_feats = torch.nn.functional.interpolate(img2_feats, load_size, mode="bilinear")
    source_idx = torch.from_numpy(ref_points_to_idxs(source_points, load_size)).long()
    img1_feats = ref_flatten(img1_feats)[:, source_idx, :]
    img1_feats = ref_normalize(img1_feats)
    img2_feats = ref_normalize(ref_flatten(img2_feats))
    sims = torch.matmul(img1_feats, img2_feats.permute((0, 2, 1)))
    num_pixels = int(math.sqrt(sims.shape[-1]))
    points2 = sims.argmax(dim=-1)
    return torch.stack([points2 // num_pixels, points2 % num_pixels], dim=-1)[0]


def ref_compute_pck(predicted_points, target_points, load_size, pck_threshold=0.1, target_bounding_box=None):
    distances = np.linalg.norm(predicted_points - target_points, axis=-1)
    if target_bounding_box is None:
        pck = distances <= pck_threshold * max(load_size)
    else:
        left, top, right, bottom = target_bounding_box
        pck = distances <= pck_threshold * max(right - left, bottom - top)
    return distances, pck, pck.sum() / len(pck)


def ref_pair(feat_src, feat_tgt, ann, source_size, target_size, load_size=(16, 16), alpha=0.1):
    """validate()'s body for one pair, up to the per-keypoint PCK arrays."""
    source_points = ref_rescale_points(np.flip(ann["source_points"], 1), source_size, load_size)
    target_points = ref_rescale_points(np.flip(ann["target_points"], 1), target_size, load_size)
    predicted = ref_find_nn_source_correspondences(feat_src, feat_tgt, source_points, load_size).numpy()
    predicted = ref_rescale_points(predicted, load_size, target_size)
    target_points = ref_rescale_points(target_points, load_size, target_size)
    _, pck_img, _ = ref_compute_pck(predicted, target_points, target_size, alpha)
    _, pck_bbox, _ = ref_compute_pck(predicted, target_points, target_size, alpha, ann["target_bounding_box"])
    return predicted, pck_img, pck_bbox


# ---------------------------------------------------------------- matching and PCK vs the transcription
def _pairs(n=4, seed=0):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        src_wh, tgt_wh = (int(rng.integers(20, 40)), int(rng.integers(20, 40))), (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        k = int(rng.integers(2, 6))
        ann = {"source_points": rng.integers(0, min(src_wh), (k, 2)).tolist(),
               "target_points": rng.integers(0, min(tgt_wh), (k, 2)).tolist(),
               "target_bounding_box": [2, 3, 2 + int(rng.integers(5, 15)), 3 + int(rng.integers(5, 15))],
               "category": "ab"[i % 2]}
        out.append((torch.randn(1, 5, 6, 6, generator=g), torch.randn(1, 5, 6, 6, generator=g), ann, src_wh, tgt_wh))
    return out


def test_nearest_neighbour_matches_equal_the_reference():
    for fs, ft, ann, src_wh, tgt_wh in _pairs():
        pts = ref_rescale_points(np.flip(ann["source_points"], 1), src_wh, (16, 16))
        want = ref_find_nn_source_correspondences(fs, ft, pts, (16, 16)).numpy()
        # our maps: the same features split into two activations of different channel counts
        got = nn_correspondences([fs[0, :2], fs[0, 2:]], [ft[0, :2], ft[0, 2:]], pts, (16, 16), chunk=1)
        assert np.array_equal(got, want)


def test_pck_per_image_and_per_box_equals_the_reference_pooled_over_keypoints():
    tally = PckTally(0.1)
    ref_img, ref_box, per_cat = [], [], {}
    for fs, ft, ann, src_wh, tgt_wh in _pairs(6, seed=3):
        _, want_img, want_box = ref_pair(fs, ft, ann, src_wh, tgt_wh)
        pair = KeypointPair("p", ann["category"], "", "", tuple(map(tuple, ann["source_points"])),
                            tuple(map(tuple, ann["target_points"])), tuple(ann["target_bounding_box"]))
        pred_xy = match_pair(pair, [fs[0]], [ft[0]], src_wh, tgt_wh, (16, 16))
        true_yx = np.asarray(pair.target_xy)[:, ::-1]
        _, hit_img = pck_hits(pred_xy[:, ::-1], true_yx, 0.1, tgt_wh)
        _, hit_box = pck_hits(pred_xy[:, ::-1], true_yx, 0.1, tgt_wh, pair.target_bbox)
        assert np.array_equal(hit_img, want_img) and np.array_equal(hit_box, want_box)
        tally.add(pair.category, hit_img, hit_box)
        ref_img.append(want_img)
        ref_box.append(want_box)
        per_cat.setdefault(ann["category"], []).append(want_img)
    rep = tally.to_json()
    img, box = np.concatenate(ref_img), np.concatenate(ref_box)
    assert rep["pck_img"] == pytest.approx(img.sum() / len(img)) and rep["pck_bbox"] == pytest.approx(box.sum() / len(box))
    for c, hits in per_cat.items():
        h = np.concatenate(hits)
        assert rep["per_category"][c]["pck_img"] == pytest.approx(h.sum() / len(h))


def test_rescale_points_equals_the_reference():
    pts = np.array([[3.0, 7.0], [10.5, 0.0]])
    assert np.array_equal(rescale_points(pts, (30, 20), (512, 512)), ref_rescale_points(pts, (30, 20), (512, 512)))


# ---------------------------------------------------------------- SPair-71k tree through the CLI
def _spair_tree(root, categories=("circle", "square"), per_cat=2, outside=False, drop_images_of=None):
    from difffeat.shapes import world

    ann_dir = root / "PairAnnotation" / "test"
    ann_dir.mkdir(parents=True)
    n = 0
    for cat in categories:
        img_dir = root / "JPEGImages" / cat
        img_dir.mkdir(parents=True, exist_ok=True)
        for j in range(per_cat):
            names = []
            for side in range(2):
                s = world.sample("test", 10 * n + side)
                name = f"img{n}_{side}.jpg"
                s.image.save(img_dir / name, quality=95)
                names.append((name, s))
            (src, ss), (tgt, st) = names
            kps = lambda s: [[b.bbox[0] + b.bbox[2] // 2, b.bbox[1] + b.bbox[3] // 2] for b in s.instances]  # noqa: E731
            k = min(len(ss.instances), len(st.instances))
            src_kps, trg_kps = kps(ss)[:k], kps(st)[:k]
            if outside and n == 0:
                trg_kps[0] = [70, 5]  # the image is 64 px wide
            ann = {"src_imname": src, "trg_imname": tgt, "category": cat, "src_kps": src_kps, "trg_kps": trg_kps,
                   "src_bndbox": [0, 0, 63, 63], "trg_bndbox": [4, 4, 40, 50]}
            (ann_dir / f"{n:06d}-{src[:-4]}-{tgt[:-4]}:{cat}.json").write_text(json.dumps(ann))
            n += 1
        if drop_images_of == cat:
            for p in img_dir.iterdir():
                p.unlink()
            img_dir.rmdir()
    return root


def test_a_miniature_spair_tree_evaluates_through_the_cli(tmp_path):
    root = _spair_tree(tmp_path / "SPair-71k")
    out = tmp_path / "out"
    res = runner.invoke(app, ["correspond", "shapes", "--spair", str(root), "--preset", "shapes-practical",
                              "--out", str(out), "--load-size", "64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["per_category"]) == {"circle", "square"} and rep["pairs"] == 4
    preds = json.loads((out / "predictions.json").read_text())
    hits = np.concatenate([p["correct_img"] for p in preds])
    assert rep["keypoints"] == len(hits) and rep["pck_img"] == pytest.approx(hits.mean())
    assert 0 <= rep["pck_bbox"] <= 1 and "PCK img" in res.output


def test_a_pair_of_an_image_with_itself_matches_every_keypoint(tmp_path):
    import difffeat
    from difffeat.runs.correspond import CorrespondJob, run_correspond
    from difffeat.evaluate.spair import spair_pairs

    root = _spair_tree(tmp_path / "SPair-71k", categories=("circle",), per_cat=1)
    pair = spair_pairs(root)[0]
    same = KeypointPair("self", "circle", pair.source, pair.source, pair.source_xy, pair.source_xy, (0, 0, 63, 63))
    fx = difffeat.FeatureExtractor(difffeat.load("shapes", device="cpu"), preset="shapes-practical", square=True)
    rep = run_correspond(fx, [same], CorrespondJob(tmp_path / "o", load_size=(64, 64), progress=False))
    assert rep.scores["pck_img"] == 1.0


def test_multi_seed_features_are_the_mean_of_the_single_seed_features():
    import difffeat
    from difffeat.runs.correspond import averaged_features
    from difffeat.shapes import world

    fx = difffeat.FeatureExtractor(difffeat.load("shapes", device="cpu"), preset="shapes-practical")
    im = world.sample("test", 0).image
    avg = averaged_features(fx, [im], ensemble_size=3)[0]
    singles = []
    for s in range(3):
        singles.append(difffeat.FeatureExtractor(fx.backbone, preset="shapes-practical", seed=s)(im))
    for n in fx.names:
        assert torch.allclose(avg[n], sum(d[n][0] for d in singles) / 3, atol=1e-6)
    assert not torch.allclose(singles[0][fx.names[0]], singles[1][fx.names[0]])  # the seeds do differ


def test_a_keypoint_outside_the_image_fails_before_the_model_loads(tmp_path):
    root = _spair_tree(tmp_path / "SPair-71k", outside=True)
    res = runner.invoke(app, ["correspond", "no/such-model", "--spair", str(root), "--preset", "shapes-practical", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "outside its image" in res.output and "x=70" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_an_spair_tree_missing_a_category_fails_before_the_model_loads(tmp_path):
    root = _spair_tree(tmp_path / "SPair-71k")
    res = runner.invoke(app, ["correspond", "no/such-model", "--spair", str(root), "--categories", "circle,aeroplane",
                              "--preset", "shapes-practical", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "aeroplane" in res.output and len(res.output.strip().splitlines()) == 1
    root2 = _spair_tree(tmp_path / "SPair2", drop_images_of="square")
    res = runner.invoke(app, ["correspond", "no/such-model", "--spair", str(root2), "--preset", "shapes-practical", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "'square' has no image folder" in res.output


def test_the_reference_pair_list_json_loads_and_names_a_missing_image(tmp_path):
    from difffeat.evaluate.spair import pair_list
    from difffeat.errors import DatasetError

    root = _spair_tree(tmp_path / "SPair-71k", categories=("circle",), per_cat=1)
    ann = json.loads(next((root / "PairAnnotation" / "test").glob("*.json")).read_text())
    entry = {"source_path": f"circle/{ann['src_imname']}", "target_path": f"circle/{ann['trg_imname']}",
             "source_points": ann["src_kps"], "target_points": ann["trg_kps"], "category": "circle",
             "target_bounding_box": ann["trg_bndbox"], "source_bounding_box": [0, 0, 63, 63]}
    (tmp_path / "pairs.json").write_text(json.dumps([entry]))
    pairs = pair_list(tmp_path / "pairs.json", root / "JPEGImages")
    assert len(pairs) == 1 and pairs[0].source_xy == tuple(map(tuple, map(lambda p: map(float, p), ann["src_kps"])))
    (tmp_path / "bad.json").write_text(json.dumps([{**entry, "target_path": "circle/missing.jpg"}]))
    with pytest.raises(DatasetError, match="missing.jpg"):
        pair_list(tmp_path / "bad.json", root / "JPEGImages")


def test_correspond_takes_techniques_and_records_them(tmp_path):
    root = _spair_tree(tmp_path / "SPair-71k", categories=("circle",), per_cat=1)
    out = tmp_path / "out"
    res = runner.invoke(app, ["correspond", "shapes", "--spair", str(root), "--preset", "shapes-practical", "--out", str(out),
                              "--load-size", "64", "--device", "cpu", "--technique", "prompt:quality=natural",
                              "--technique", "prompt:template=a photo of {}"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["features"]["variants"]) == ["prompt:quality=natural", "prompt:template=a photo of {}"]
