"""Label-scarce segmentation runs: features streamed from disk into the published pixel-classifier protocol.

1. The run engine's extraction (:func:`run_extract`) writes the features of every labelled image that a split
   trains or tests on (``train_count``/``test_count`` may leave images unused), at the model's own resolution,
   to ``OUT/features/<stem>.safetensors`` (resumable, atomic, sharded like ``extract``).
2. For each random split (:func:`~difffeat.evaluate.pixel_ensemble.shuffle_split`) an ensemble of
   :class:`~difffeat.evaluate.pixel_ensemble.PixelMLP` trains on the training images' pixels. Pixels are
   streamed: ``pool`` images' native feature maps are read at a time, their labelled pixels shuffled together,
   and each pixel's feature vector is bilinearly sampled from the native maps where a batch needs it, so
   RAM holds ``pool`` native maps and one block of pixel vectors, never the upsampled dataset (the reference
   keeps every upsampled feature in RAM). With ``pool`` >= the training images an epoch is one global shuffle.
3. The test images are predicted (ensemble vote) and scored; mIoU is averaged over splits.

Every trained classifier is saved as it finishes (``OUT/classifiers/split<s>-model<m>.safetensors``, with what
determines it: protocol, features, prompt, training images, seed), so a killed run resumes where it stopped:
features already on disk are not recomputed and classifiers whose stored key equals the current one are loaded
instead of retrained (each classifier has its own seeded generator, so the result equals an uninterrupted run).
A file whose key differs (other settings) is retrained and replaced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from ..evaluate.pixel_ensemble import (
    EarlyStop, PixelEnsemble, PixelMLP, ScarceProtocol, class_ious, drop_small_annotations, iou_counts, shuffle_split,
)
from ..evaluate.pixels import pixel_features
from ..evaluate.scarce_data import LabelledSet, label_grid, read_label, resize_label
from ..features import FeatureExtractor
from ..io import load_features, write_json

__all__ = ["split_indices"]

#: pixels whose feature vectors are sampled at once (bounds the memory of one block: BLOCK x C floats)
BLOCK = 16384


@dataclass
class ProbeJob:
    """Options of a label-scarce segmentation run (see :func:`run_probe`)."""

    out_dir: Path
    protocol: ScarceProtocol = field(default_factory=ScarceProtocol)
    train_count: int | None = None  # labelled training images per split (default: the set's own training part)
    test_count: int | None = None  # at most this many test images per split (default: all the others)
    prompt: str = ""
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = True
    device: str | None = None  # where the classifiers train (default: the model's device)


@dataclass
class ProbeReport:
    """mIoU over the random splits (mean and population standard deviation) and per split/class."""

    miou_mean: float
    miou_std: float
    miou_per_split: list[float]
    class_iou_mean: list[float]
    n_train: int
    n_test: int
    num_classes: int
    features: dict[str, Any]
    protocol: dict[str, Any]
    splits: list[dict[str, list[str]]]
    classifier: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def split_indices(n_items: int, n_layout_train: int, split: int, protocol: ScarceProtocol,
                  train_count: int | None = None, test_count: int | None = None) -> tuple[list[int], list[int]]:
    """Train/test item indices of random split ``split``: the reference's shuffle of train + test with seed
    ``protocol.seed + split``, then the first ``train_count`` (default: the layout's training part) train."""
    n_tr = n_layout_train if train_count is None else train_count
    order_tr, order_te = shuffle_split(n_layout_train, n_items - n_layout_train, protocol.seed + split, protocol.shuffle)
    order = order_tr + order_te
    train, test = order[:n_tr], order[n_tr:]
    return train, test[:test_count] if test_count else test


def check_counts(data: LabelledSet, protocol: ScarceProtocol, train_count: int | None, test_count: int | None) -> None:
    """Range checks of the split sizes (before any model loads)."""
    n = len(data)
    if train_count is not None and (isinstance(train_count, bool) or not isinstance(train_count, int) or not 1 <= train_count <= n - 1):
        raise InvalidOptionError(f"--train-count must be an integer in 1..{n - 1} (the set has {n} labelled images), got {train_count!r}")
    if test_count is not None and (isinstance(test_count, bool) or not isinstance(test_count, int) or test_count < 1):
        raise InvalidOptionError(f"--test-count must be an integer >= 1, got {test_count!r}")
    if data.n_train >= n and train_count is None:
        raise InvalidOptionError(f"all {n} images are training images; pass --train-count K (K < {n}) to hold the rest out for testing")
    if not protocol.shuffle and protocol.splits > 1:
        raise InvalidOptionError("without shuffling every split is the same; pass splits=1 or shuffle=True")


class _Cached:
    """The cached native feature maps of one run, read one image at a time."""

    def __init__(self, folder: Path, names: list[str]) -> None:
        self.folder, self.names = folder, names

    def maps(self, stem: str) -> list[torch.Tensor]:
        feats = load_features(self.folder / f"{stem}.safetensors")
        return [feats[n] for n in self.names]

    def channels(self, stem: str) -> int:
        return sum(m.shape[0] for m in self.maps(stem))


def _train_labels(data: LabelledSet, idx: Sequence[int], protocol: ScarceProtocol) -> list[np.ndarray]:
    out = []
    for i in idx:
        lab = read_label(data.items[i].label)
        lab = resize_label(lab, label_grid(lab.shape, protocol.label_size))
        out.append(drop_small_annotations(lab, data.num_classes, protocol.min_pixels, protocol.ignore_label))
    return out


def _batches(cache: _Cached, data: LabelledSet, train: Sequence[int], labels: Sequence[np.ndarray],
             protocol: ScarceProtocol, g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled ``(x [B, C], y [B])`` batches; the last incomplete batch is dropped."""
    order = torch.randperm(len(train), generator=g).tolist()
    carry_x: list[torch.Tensor] = []
    carry_y: list[torch.Tensor] = []
    carry_n = 0
    bs = protocol.batch_size
    for p0 in range(0, len(order), protocol.pool):
        pool = order[p0:p0 + protocol.pool]
        maps = [cache.maps(data.items[train[j]].stem) for j in pool]
        pix = [torch.from_numpy(np.flatnonzero(labels[j].ravel() != protocol.ignore_label)) for j in pool]
        owner = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(pix)])
        flat = torch.cat(pix)
        perm = torch.randperm(len(flat), generator=g)
        for b0 in range(0, len(perm), BLOCK):
            sel = perm[b0:b0 + BLOCK]
            x = None
            y = torch.empty(len(sel), dtype=torch.long)
            for k, j in enumerate(pool):
                rows = torch.nonzero(owner[sel] == k).flatten()
                if not len(rows):
                    continue
                pidx = flat[sel[rows]]
                fk = pixel_features(maps[k], pidx, labels[j].shape)
                if x is None:
                    x = torch.empty(len(sel), fk.shape[1])
                x[rows] = fk
                y[rows] = torch.from_numpy(labels[j].ravel()[pidx.numpy()].astype(np.int64))
            if x is None:
                continue
            carry_x.append(x)
            carry_y.append(y)
            carry_n += len(y)
            if carry_n >= bs:
                xs, ys = torch.cat(carry_x), torch.cat(carry_y)
                full = (len(ys) // bs) * bs
                for s in range(0, full, bs):
                    yield xs[s:s + bs], ys[s:s + bs]
                carry_x, carry_y, carry_n = [xs[full:]], [ys[full:]], len(ys) - full


def _classifier_key(fx: FeatureExtractor, job: ProbeJob, data: LabelledSet, train: Sequence[int], channels: int,
                    seed: int) -> dict[str, Any]:
    """What determines one trained classifier (its weights are a function of exactly these)."""
    proto = job.protocol.to_json()
    proto.pop("splits")  # the number of splits does not change one split's classifiers
    proto.pop("models")
    return {"protocol": proto, "features": fx.settings(), "prompt": job.prompt, "num_classes": data.num_classes,
            "channels": channels, "seed": seed, "train": [data.items[i].stem for i in train]}


def _stored_classifier(path: Path, key: dict[str, Any], device) -> PixelMLP | None:
    """The classifier saved at ``path`` if its key equals ``key`` (a JSON round trip of both), else None."""
    import json

    if not path.is_file():
        return None
    try:
        ens = PixelEnsemble.load(path, device)
    except Exception:  # a damaged file is recomputed  # noqa: BLE001
        return None
    if ens.info.get("key") != json.loads(json.dumps(key)):
        return None
    return ens.models[0]


def _train_model(cache, data, train, labels, channels, protocol: ScarceProtocol, seed: int, device) -> PixelMLP:
    g = torch.Generator().manual_seed(seed)
    model = PixelMLP(channels, data.num_classes).init_weights(g).to(device)
    try:  # the fused kernel (CPU and CUDA): the same Adam update, ~1.7x faster steps on these small MLPs
        opt = torch.optim.Adam(model.parameters(), lr=protocol.lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(model.parameters(), lr=protocol.lr)
    stop = EarlyStop(protocol.patience, protocol.patience_from_epoch)
    model.train()
    with torch.enable_grad():
        for epoch in range(protocol.epochs):
            stopped = False
            for x, y in _batches(cache, data, train, labels, protocol, g):
                opt.zero_grad()
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                loss.backward()
                opt.step()
                if stop.update(epoch, loss.item()):
                    stopped = True
                    break
            if stopped:
                break
    return model.eval()


def _predict(ensemble: PixelEnsemble, maps: list[torch.Tensor], grid: tuple[int, int]) -> np.ndarray:
    n = grid[0] * grid[1]
    out = torch.empty(n, dtype=torch.long)
    for s in range(0, n, BLOCK):
        idx = torch.arange(s, min(n, s + BLOCK))
        out[idx] = ensemble.predict(pixel_features(maps, idx, grid))
    return out.reshape(grid).numpy()


def run_probe(fx: FeatureExtractor, data: LabelledSet, job: ProbeJob, state=None) -> ProbeReport:
    """Label-scarce segmentation of ``data`` with ``fx``'s features (see the module docstring); writes
    ``OUT/features/``, ``OUT/classifiers/`` (one file per trained classifier, for resuming),
    ``OUT/classifier.safetensors`` (split 0's ensemble) and ``OUT/report.json``."""
    from .extract import ExtractJob, run_extract
    from .sources import ImageRef

    protocol = job.protocol
    check_counts(data, protocol, job.train_count, job.test_count)
    out = Path(job.out_dir)
    feat_dir = out / "features"
    plan = [split_indices(len(data), data.n_train, s, protocol, job.train_count, job.test_count)
            for s in range(protocol.splits)]
    used = sorted({i for train, test in plan for i in (*train, *test)})  # only images some split uses
    refs = [ImageRef(data.items[i].stem, data.items[i].image) for i in used]
    run_extract(fx, refs, ExtractJob(feat_dir, prompt=job.prompt, num_workers=job.num_workers, overwrite=job.overwrite,
                                     progress=job.progress, dataset=data.source), state)
    cache = _Cached(feat_dir, fx.names)
    channels = cache.channels(data.items[used[0]].stem)
    device = torch.device(job.device) if job.device else fx.backbone.device
    from tqdm.auto import tqdm

    mious, class_sum, splits, classifier = [], np.zeros(data.num_classes), [], None
    for s in range(protocol.splits):
        train, test = plan[s]
        labels = _train_labels(data, train, protocol)
        models = []
        for m in tqdm(range(protocol.models), desc=f"split {s + 1}/{protocol.splits}: classifiers", disable=not job.progress):
            seed = protocol.seed * 1_000_003 + s * 1009 + m
            key = _classifier_key(fx, job, data, train, channels, seed)
            path = out / "classifiers" / f"split{s}-model{m}.safetensors"
            model = None if job.overwrite else _stored_classifier(path, key, device)
            if model is None:
                model = _train_model(cache, data, train, labels, channels, protocol, seed, device)
                path.parent.mkdir(parents=True, exist_ok=True)
                PixelEnsemble([model], {"key": key}).save(path)
            models.append(model)
        ensemble = PixelEnsemble(models, {"extractor": fx.settings(), "prompt": job.prompt,
                                          "label_size": protocol.label_size, "num_classes": data.num_classes})
        inter, union = np.zeros(data.num_classes), np.zeros(data.num_classes)
        for i in test:
            gt = read_label(data.items[i].label)
            grid = label_grid(gt.shape, protocol.label_size)
            pred = _predict(ensemble, cache.maps(data.items[i].stem), grid)
            a, b = iou_counts(pred, resize_label(gt, grid), data.num_classes, protocol.ignore_label, protocol.void_in_eval)
            inter += a
            union += b
        ious = class_ious(inter, union)
        mious.append(float(ious.mean()))
        class_sum += ious
        splits.append({"train": [data.items[i].stem for i in train], "test": [data.items[i].stem for i in test]})
        if s == 0:
            classifier = str(ensemble.save(out / "classifier.safetensors"))
    n_tr = len(splits[0]["train"])
    report = ProbeReport(float(np.mean(mious)), float(np.std(mious)), mious, (class_sum / protocol.splits).tolist(),
                         n_tr, len(splits[0]["test"]), data.num_classes, fx.settings(), protocol.to_json(), splits,
                         classifier)
    write_json(out / "report.json", report.to_json())
    return report


def predict_label_maps(fx: FeatureExtractor, ensemble: PixelEnsemble, images: Sequence[Any], prompt: str = "") -> list[np.ndarray]:
    """Label maps of new images with a trained :class:`PixelEnsemble` (``difffeat probe``'s classifier), each
    on the label grid of its image (long side = the classifier's ``label_size``)."""
    from ..images import to_rgb

    label_size = ensemble.info.get("label_size")
    rgb = [to_rgb(im) for im in images]
    out: list[np.ndarray] = [np.zeros(0, np.uint8)] * len(rgb)
    for item in fx.iter_items(rgb, prompt):
        w, h = rgb[item.index].size
        grid = label_grid((h, w), label_size)
        out[item.index] = _predict(ensemble, [item.features[n] for n in fx.names], grid).astype(np.uint8)
    return out
