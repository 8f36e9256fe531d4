"""`difffeat probe --rank`: every chosen candidate activation scored by a linear probe, ranked, saved as a
preset file that --preset accepts."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

import difffeat
from difffeat.cli import app
from difffeat.evaluate.pixels import pixel_features
from difffeat.evaluate.probe import PixelProbe
from difffeat.evaluate.scarce_data import ddpm_segmentation

from test_scarce import _ddpm_tree

runner = CliRunner()


def test_rank_scores_each_activation_as_its_own_probe_would(tmp_path):
    from difffeat.runs.rank import _sampled, rank_activations

    data = ddpm_segmentation(_ddpm_tree(tmp_path / "mini"), 3)
    backbone = difffeat.load("shapes", device="cpu")
    rows = rank_activations(backbone, data, blocks="up_blocks.1.attentions.0", progress=False, group=3)
    assert [r.miou for r in rows] == sorted((r.miou for r in rows), reverse=True)
    assert all((r.name + ".").startswith("up_blocks.1.attentions.0.") for r in rows) and len(rows) >= 4
    row = rows[-1]
    # the same probe on one activation extracted alone
    from difffeat.runs.scarce import split_indices
    from difffeat.evaluate.pixel_ensemble import ScarceProtocol

    train, test = split_indices(len(data), data.n_train, 0, ScarceProtocol(splits=1))
    samples = _sampled(data, train + test, 64, 256, 0)
    fx = difffeat.FeatureExtractor(backbone, [row.name])
    vec = [pixel_features([fx(data.items[i].image)[row.name][0]], s[1], s[0]) for i, s in zip(train + test, samples)]
    x_tr, x_te = torch.cat(vec[:len(train)]).T[None, :, None], torch.cat(vec[len(train):]).T[None, :, None]
    y_tr = torch.cat([s[2] for s in samples[:len(train)]])[None, None]
    y_te = torch.cat([s[2] for s in samples[len(train):]])[None, None]
    score = PixelProbe(3, pixels_per_image=x_tr.shape[-1]).fit(x_tr, y_tr).score(x_te, y_te)
    assert row.miou == pytest.approx(score.miou, abs=1e-6)


def test_rank_through_the_cli_saves_a_preset_that_extract_accepts(tmp_path):
    root = _ddpm_tree(tmp_path / "mini")
    preset = tmp_path / "mine.yaml"
    res = runner.invoke(app, ["probe", "shapes", "--ddpm", str(root), "--num-classes", "3", "--rank", "--kinds",
                              "cross-q,vit-out", "--save-preset", str(preset), "--top", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "ranked by linear-probe mIoU" in res.output
    doc = yaml.safe_load(preset.read_text())
    assert len(doc["features"]) == 2 and doc["family"] == "sd" and doc["validated"] is False
    fx = difffeat.FeatureExtractor(difffeat.load("shapes", device="cpu"), preset=str(preset))
    assert fx.names == doc["features"]
    res = runner.invoke(app, ["extract", "shapes", str(root / "real" / "test"), "--preset", str(preset), "--out",
                              str(tmp_path / "f"), "--device", "cpu", "--num-workers", "0"])
    assert res.exit_code == 0, res.output


def test_rank_with_a_filter_matching_nothing_is_a_clear_error(tmp_path):
    root = _ddpm_tree(tmp_path / "mini")
    res = runner.invoke(app, ["probe", "shapes", "--ddpm", str(root), "--num-classes", "3", "--rank", "--blocks", "nowhere", "--device", "cpu"])
    assert res.exit_code == 2 and "no candidate activation" in res.output
