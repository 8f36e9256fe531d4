"""The conformance suite: every registered family, through one set of checks.

A family is known to work because this suite says so. For each registered adapter the registry and the
shipped data give a complete :class:`~_helpers.FamilySpec` (tiny builder, hook table, preset, GOCA config,
real-size config); for each tiny pipeline a fixed tiny input gives the golden output stored under
``tests/goldens/<tiny>.safetensors`` (a few kB): the head-mean cross maps of its first and last GOCA cross
layers at every ``k``-th query row (``maps.i``, ``[rows, text keys]``) and their labels, each row's most
attended text key (``labels.i``). A family whose token layout (or anything else on the way to the maps) goes
wrong changes them; the planted tests at the end show that a wrong layout does fail.

Tolerances (valid on any x86-64 CPU and thread count, where float32 sums may run in another order):

- maps: softmax probabilities of a float32 forward through a few tiny layers; reordered sums move a logit
  by ~1e-6 (relative), hence a probability by ~1e-6 relative: ``rtol=1e-3`` leaves a 1000x margin, and
  ``atol`` is 1e-3 of the golden's mean for the near-zero entries. A wrong layout moves them by O(1).
- labels: an argmax can flip only where the top two probabilities are within the maps' tolerance of each
  other, so labels are compared exactly where the golden's margin exceeds twice it (and nowhere else).

The segmentation's own outputs are not stored: on the random tiny models its class maps are nearly flat and
min-max normalised, and some families' (PixArt's) move by whole steps when only the thread count changes.

``DIFFFEAT_WRITE_GOLDENS=1 pytest tests/test_conformance.py -k golden`` (re)writes the goldens of the selected
families (for a new family: its other checks in this suite and ``tests/test_capture.py`` are the independent
ones; the golden pins what they accepted).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import difffeat
from difffeat.backbones import FAMILIES as ADAPTERS
from difffeat.backbones.layout import AttendedTokens, TokenLayout
from difffeat.capture import Capture, head_mean
from difffeat.hookpoints import load_table

from _helpers import FAMILIES, backbone_for, family_specs, random_image, tiny_family

GOLDENS = Path(__file__).resolve().parent / "goldens"
MAP_RTOL = 1e-3
#: query rows kept per stored map (every k-th)
MAX_ROWS = 48


# --------------------------------------------------------------------------- the registry is complete
def test_every_registered_family_has_a_complete_spec():
    specs = family_specs()
    assert set(specs) == set(ADAPTERS)
    for family, spec in specs.items():
        assert spec.tiny and spec.tiny[0] == family, f"{family}: no tiny builder in difffeat.testing named after it"
        assert load_table(spec.hook_table).points, family
        assert spec.presets, f"{family}: no preset in configs/features"
        assert spec.goca_config is not None, f"{family}: no configs/goca/{family}.yaml"
        assert spec.architectures, f"{family}: no real-size config in configs/architectures"
        assert isinstance(spec.adapter.token_layout, TokenLayout), family


def test_every_tiny_pipeline_loads_as_a_registered_family():
    assert {tiny_family(name) for name in FAMILIES} == set(ADAPTERS)


# --------------------------------------------------------------------------- golden outputs
def golden_output(backbone: difffeat.Backbone) -> dict[str, torch.Tensor]:
    """The fixed tiny input's head-mean cross maps (first and last GOCA cross layer, every k-th query row) and
    each row's most attended text key."""
    seg = difffeat.Segmenter(backbone, method="goca")
    names = [seg.cross_names[0], seg.cross_names[-1]]
    s = seg.settings
    inputs = backbone.prepare([random_image(48, 64, seed=3)], "a photo of a cat and a dog", s.t, s.seed, s.resolution)
    with Capture(backbone, names, inputs, early_exit=False, map_reducer=head_mean) as cap:
        backbone.denoise(inputs)
    out = {}
    for i, name in enumerate(names):
        m = cap.activations[name][0].float()  # [HW, T]
        m = m[:: max(1, m.shape[0] // MAX_ROWS)].contiguous()
        out[f"maps.{i}"], out[f"labels.{i}"] = m, m.argmax(dim=-1)
    return out


def golden_mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """What differs beyond the tolerances (see the module docstring); empty when the outputs agree."""
    bad = []
    for key in sorted(want):
        if key not in got or got[key].shape != want[key].shape:
            bad.append(f"{key}: shape {tuple(got[key].shape) if key in got else None} != {tuple(want[key].shape)}")
    if bad:
        return bad
    for key in sorted(k for k in want if k.startswith("maps.")):
        m = want[key]
        atol = 1e-3 * float(m.abs().mean())
        allowed = atol + MAP_RTOL * m.abs()  # [rows, T]
        if ((got[key] - m).abs() > allowed).any():
            bad.append(f"{key}: max deviation {float((got[key] - m).abs().max()):.3g} beyond tolerance")
        top2 = m.topk(2, dim=-1)
        peaked = (top2.values[:, 0] - top2.values[:, 1]) > 2 * allowed.gather(1, top2.indices).sum(-1)
        label = key.replace("maps.", "labels.")
        differ = (got[label] != want[label]) & peaked
        if differ.any():
            bad.append(f"{label}: {int(differ.sum())} of {int(peaked.sum())} peaked rows differ")
    return bad


def _golden_path(name: str) -> Path:
    return GOLDENS / f"{name}.safetensors"


@pytest.mark.parametrize("name", FAMILIES)
def test_golden_output(tiny_pipes, name):
    got = golden_output(backbone_for(tiny_pipes, name))
    path = _golden_path(name)
    if os.environ.get("DIFFFEAT_WRITE_GOLDENS") == "1":
        GOLDENS.mkdir(exist_ok=True)
        save_file(got, str(path))
    assert path.is_file(), f"no golden for {name}: write it with DIFFFEAT_WRITE_GOLDENS=1 pytest {__file__} -k {name}"
    want = load_file(str(path))
    assert not golden_mismatches(got, want), golden_mismatches(got, want)
    # the comparison is not vacuous: labels are compared somewhere, and maps are not flat
    assert all(float(want[k].std()) > 0 for k in want if k.startswith("maps."))


# --------------------------------------------------------------------------- planted: a wrong layout fails
class _TextOffByOne(TokenLayout):
    """The right layout, except that every joint call's text slice starts one key early."""

    def attended(self, *args, **kwargs) -> AttendedTokens:
        got = super().attended(*args, **kwargs)
        text = got.text_keys
        if text is None or got.image_keys is None:
            return got
        return got._replace(text_keys=slice(text.start - 1, text.stop - 1))


def _planted(monkeypatch, tiny_pipes, name: str, adapter_attr: str, value) -> list[str]:
    backbone = backbone_for(tiny_pipes, name)
    monkeypatch.setattr(type(backbone), adapter_attr, value)
    try:
        return golden_mismatches(golden_output(backbone), load_file(str(_golden_path(name))))
    finally:
        monkeypatch.undo()


def test_planted_text_first_read_as_image_first_fails(monkeypatch, tiny_pipes):
    assert ADAPTERS["flux"].token_layout.text_first
    bad = _planted(monkeypatch, tiny_pipes, "flux", "token_layout", TokenLayout("image-first"))
    assert any(b.startswith("maps.") for b in bad), bad


def test_planted_text_slice_off_by_one_fails(monkeypatch, tiny_pipes):
    assert ADAPTERS["sd3"].token_layout.order == "image-first"
    bad = _planted(monkeypatch, tiny_pipes, "sd3", "token_layout", _TextOffByOne("image-first"))
    assert any(b.startswith("maps.") for b in bad), bad


def test_planted_packed_offsets_one_early_fail(monkeypatch, tiny_pipes):
    adapter = ADAPTERS["lumina2"]
    right = adapter.layout

    def shifted(self, grid, cond=None):
        layout = right(self, grid, cond)
        return layout if layout.image_offsets is None else layout.at(grid, layout.text_len, layout.image_offsets - 1)

    bad = _planted(monkeypatch, tiny_pipes, "lumina2", "layout", shifted)
    assert any(b.startswith("maps.") for b in bad), bad
