"""Activation ranking (the activation paper's method, for any family): every candidate activation of the
catalog, or those of some kinds / blocks, scored by a fast probe on the user's labelled images.

Each activation's features are upsampled (bilinearly, at sampled pixels only) to the label grid; a linear
pixel probe (:class:`~difffeat.evaluate.probe.PixelProbe`) is fitted on the training images' sampled pixels and
scored (mIoU over the classes present, pixel accuracy) on the test images' pixels; pixels labelled 255 never
count. Activations are captured ``group`` at a time (one forward per image and group), so memory holds the
sampled pixel vectors of one group. The ranked rows save as a preset file that ``--preset FILE`` accepts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidOptionError
from ..evaluate.pixels import pixel_features
from ..evaluate.probe import PixelProbe
from ..evaluate.scarce_data import LabelledSet, label_grid, read_label, resize_label

__all__ = ["candidate_names"]


@dataclass
class RankRow:
    """One activation's probe score and cost."""

    name: str
    kind: str
    shape: tuple[int, ...]
    miou: float
    pixel_accuracy: float
    megabytes: float  # float32 size of one image's map at the extraction resolution
    seconds: float  # probe fitting time

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


def candidate_names(catalog, kinds: str | Sequence[str] | None = None, blocks: str | Sequence[str] | None = None,
                    candidates_only: bool = True) -> list:
    """The catalog's candidate activations (no maps, no noisy kinds; with ``candidates_only=False`` every
    activation but the attention maps), restricted to ``kinds`` and to names starting with one of ``blocks``
    (e.g. ``up_blocks.1``)."""
    from ..checks import split_names

    items = catalog.select(kinds, candidates=candidates_only)
    if not candidates_only:
        items = [a for a in items if not a.is_map]
    prefixes = split_names(blocks)
    if prefixes:
        items = [a for a in items if any(a.name == p or a.name.startswith(p + ".") for p in prefixes)]
    if not items:
        raise InvalidOptionError(f"no candidate activation matches kinds={kinds!r} blocks={blocks!r}; see `difffeat catalog MODEL --candidates`")
    return items


def _sampled(data: LabelledSet, idx: Sequence[int], label_size: int, k: int, seed: int):
    """Per image: (grid, pixel indices [n], labels [n]) of up to ``k`` random labelled pixels."""
    out = []
    for i in idx:
        lab = read_label(data.items[i].label)
        grid = label_grid(lab.shape, label_size)
        lab = resize_label(lab, grid).ravel()
        valid = np.flatnonzero(lab != 255)
        rng = np.random.default_rng(seed * 100_003 + i)
        pick = np.sort(rng.choice(valid, size=min(k, len(valid)), replace=False)) if len(valid) else valid
        out.append((grid, torch.from_numpy(pick.astype(np.int64)), torch.from_numpy(lab[pick].astype(np.int64))))
    return out


def rank_activations(backbone, data: LabelledSet, *, kinds=None, blocks=None, t: int | None = None,
                     resolution: int | None = None, prompt: str = "", seed: int = 0, train_count: int | None = None,
                     test_count: int | None = None, pixels_per_image: int = 256, label_size: int = 64, group: int = 8,
                     candidates_only: bool = True, progress: bool = True) -> list[RankRow]:
    """Rows for every chosen activation, best mIoU first (see the module docstring)."""
    from tqdm.auto import tqdm

    from ..capture import catalog_of
    from ..evaluate.pixel_ensemble import ScarceProtocol
    from ..features import FeatureExtractor
    from .scarce import check_counts, split_indices

    protocol = ScarceProtocol(splits=1, seed=seed)
    check_counts(data, protocol, train_count, test_count)
    train, test = split_indices(len(data), data.n_train, 0, protocol, train_count, test_count)
    infos = candidate_names(catalog_of(backbone), kinds, blocks, candidates_only)
    samples = {i: s for i, s in zip([*train, *test], _sampled(data, [*train, *test], label_size, pixels_per_image, seed))}
    rows = []
    bar = tqdm(total=len(infos), desc="rank", unit="activation", disable=not progress)
    for g0 in range(0, len(infos), group):
        chunk = infos[g0:g0 + group]
        fx = FeatureExtractor(backbone, [a.name for a in chunk], t=t, resolution=resolution, seed=seed, batch_size=1)
        vecs: dict[str, dict[int, torch.Tensor]] = {a.name: {} for a in chunk}
        order = [*train, *test]
        for item in fx.iter_items([data.items[i].image for i in order], prompt):
            i = order[item.index]
            grid, pix, _ = samples[i]
            for a in chunk:
                vecs[a.name][i] = pixel_features([item.features[a.name]], pix, grid)
        for a in chunk:
            x_tr = torch.cat([vecs[a.name][i] for i in train]).T[None, :, None, :]  # [1, C, 1, N]
            y_tr = torch.cat([samples[i][2] for i in train])[None, None, :]
            x_te = torch.cat([vecs[a.name][i] for i in test]).T[None, :, None, :]
            y_te = torch.cat([samples[i][2] for i in test])[None, None, :]
            start = time.perf_counter()
            probe = PixelProbe(data.num_classes, pixels_per_image=x_tr.shape[-1], seed=seed).fit(x_tr, y_tr)
            score = probe.score(x_te, y_te)
            shape = tuple(item.features[a.name].shape)
            rows.append(RankRow(a.name, a.kind, shape, score.miou, score.pixel_accuracy,
                                float(np.prod(shape)) * 4 / 2**20, time.perf_counter() - start))
            bar.update(1)
    bar.close()
    return sorted(rows, key=lambda r: (-r.miou, r.name))


def save_rank_preset(rows: Sequence[RankRow], path: str | Path, *, backbone, top: int = 3, t: int | None = None,
                     resolution: int | None = None, command: str = "difffeat probe --rank") -> Path:
    """Write the ``top`` rows as a preset YAML (``--preset FILE`` loads it); not validated (a single probe
    ranking, not a published measurement)."""
    import yaml

    from ..io import write_bytes

    if top < 1:
        raise InvalidOptionError(f"--top must be >= 1, got {top}")
    best = list(rows)[:top]
    doc = {
        "family": backbone.family,
        "validated": False,
        "models": [str(backbone.name)],
        "t": int(t if t is not None else backbone.default_feature_t),
        "resolution": resolution or backbone.native_resolution,
        "source": command,
        "description": "Top activations of a linear-probe ranking: "
        + "; ".join(f"{r.name} mIoU {r.miou:.3f}" for r in best),
        "features": [r.name for r in best],
    }
    return write_bytes(path, lambda p: p.write_text(yaml.safe_dump(doc, sort_keys=False)))
