"""The downstream benchmark (benchmarks/downstream_shapes.py) resumes and runs side by side as its README
section states: results written by two processes merge, shared inputs are written once, a finished
configuration is skipped on a rerun, and a part item restricts the part to one k or seed."""

from __future__ import annotations

import json
import types

import pytest
from _helpers import load_benchmark

ds = load_benchmark("downstream_shapes")


class Started(Exception):
    """Raised where a configuration would start its measurement."""


def test_results_of_two_writers_merge_instead_of_overwriting(tmp_path):
    out = tmp_path / "r.json"
    a, b = ds.Results(str(out)), ds.Results(str(out))  # both opened before either writes
    a.put(["label_scarce", "k=5", "p", "trained"], {"miou_mean": 0.5})
    b.put(["label_scarce", "k=5", "p", "random"], {"miou_mean": 0.1})
    got = json.loads(out.read_text())["label_scarce"]["k=5"]["p"]
    assert got == {"trained": {"miou_mean": 0.5}, "random": {"miou_mean": 0.1}}


def test_a_shared_input_folder_is_written_once_and_never_half_written(tmp_path):
    calls = []

    def write(tmp):
        calls.append(tmp)
        tmp.mkdir()
        (tmp / "x").write_text("1")

    ds.once(tmp_path / "pool", write)
    ds.once(tmp_path / "pool", write)
    assert len(calls) == 1 and (tmp_path / "pool" / "x").read_text() == "1"
    assert calls[0] != tmp_path / "pool"  # written elsewhere, then renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]


def test_a_finished_configuration_is_skipped_and_a_part_item_picks_one_k(tmp_path, monkeypatch):
    from difffeat.evaluate.pixel_ensemble import ScarceProtocol

    args = types.SimpleNamespace(ks=[5, 20], presets=["shapes-practical"], weights=["trained"], models=2, splits=1,
                                 label_size=64, pool_train=20, pool_test=2)
    res = ds.Results(str(tmp_path / "r.json"))
    proto = ScarceProtocol(models=2, splits=1, label_size=64).to_json()
    res.put(["label_scarce", "k=5", "shapes-practical", "trained"], {"protocol": proto})
    ran = []

    def backbone(weights):  # stands for the model load that starts a configuration
        ran.append(weights)
        raise Started

    monkeypatch.setattr(ds, "write_pool", lambda *a: None)
    monkeypatch.setattr(ds, "backbone", backbone)
    ds.part_scarce(args, res, tmp_path, lambda: None, "5")
    assert ran == []  # k = 5 is done with this protocol
    with pytest.raises(Started):
        ds.part_scarce(args, res, tmp_path, lambda: None, "20")
    assert ran == ["trained"]  # k = 20 is not
