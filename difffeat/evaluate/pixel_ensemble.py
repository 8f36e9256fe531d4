"""The label-scarce segmentation protocol of the activation paper (pixel classifiers on frozen features).

The published protocol (DatasetGAN's, as Darkbblue/generic-diffusion-feature ``scarce_segmentation/`` runs it):

* every pixel is one sample: the features of all activations, bilinearly upsampled to the label grid and
  concatenated, are its ``[C]`` vector; pixels labelled ``ignore_label`` (255) are dropped from training, and a
  class covering fewer than ``min_pixels`` (20) pixels of a training image is set to ``ignore_label`` there;
* an ensemble of ``models`` (10) MLPs, each ``C -> 128 -> 32 -> K`` (ReLU then BatchNorm after each hidden
  layer; ``C -> 256 -> 128 -> K`` when K >= 30), weights ~ N(0, 0.02), biases 0, trained with Adam (lr 1e-3)
  on cross-entropy in shuffled batches of 64 for at most 100 epochs, stopping early (:class:`EarlyStop`);
* prediction: each model's argmax per pixel, then the per-pixel mode over models (ties: the smallest label);
* score: per class IoU = intersection / (1e-8 + union) summed over the test images, mIoU = the mean over all K
  classes; the paper averages five runs, each on a random re-split of train + test.

This module holds the maths only (tensors in, tensors out); :mod:`difffeat.runs.scarce` streams the features.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DifffeatError, InvalidOptionError

__all__ = ["EarlyStop", "vote", "class_ious", "iou_counts", "shuffle_split", "drop_small_annotations", "IGNORE_LABEL"]

IGNORE_LABEL = 255


@dataclass(frozen=True)
class ScarceProtocol:
    """Settings of the pixel-classifier protocol; the defaults are the published ones.

    ``pool``: training images whose pixels are shuffled together (difffeat streams features from disk; with
    ``pool`` >= the number of training images every epoch is one global shuffle, as in the reference).
    ``void_in_eval``: "ignore" leaves 255 pixels out of the test IoU; "reference" counts them as the published
    code does (a prediction there adds to that class's union)."""

    models: int = 10
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    patience: int = 50
    patience_from_epoch: int = 4
    min_pixels: int = 20
    splits: int = 5
    shuffle: bool = True
    seed: int = 0
    pool: int = 16
    label_size: int | None = 256
    ignore_label: int = IGNORE_LABEL
    void_in_eval: str = "ignore"

    def __post_init__(self) -> None:
        for name, lo in (("models", 1), ("epochs", 1), ("batch_size", 1), ("patience", 1), ("splits", 1), ("pool", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InvalidOptionError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not (0 < self.lr <= 1):
            raise InvalidOptionError(f"lr must be in (0, 1], got {self.lr!r}")
        if self.min_pixels < 0 or self.patience_from_epoch < 0:
            raise InvalidOptionError("min_pixels and patience_from_epoch must be >= 0")
        if self.label_size is not None and not (8 <= int(self.label_size) <= 4096):
            raise InvalidOptionError(f"label_size must be between 8 and 4096 px (or None: the labels' own size), got {self.label_size!r}")
        if self.void_in_eval not in ("ignore", "reference"):
            raise InvalidOptionError(f"void_in_eval must be ignore or reference, got {self.void_in_eval!r}")

    def to_json(self) -> dict:
        return asdict(self)


class PixelMLP(nn.Module):
    """The published pixel classifier: ``C -> 128 -> 32 -> K`` (``C -> 256 -> 128 -> K`` for K >= 30), each
    hidden layer Linear, ReLU, BatchNorm1d; Linear weights ~ N(0, 0.02), biases 0 (:meth:`init_weights`)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        h1, h2 = (128, 32) if num_classes < 30 else (256, 128)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.layers = nn.Sequential(
            nn.Linear(in_channels, h1), nn.ReLU(), nn.BatchNorm1d(h1),
            nn.Linear(h1, h2), nn.ReLU(), nn.BatchNorm1d(h2),
            nn.Linear(h2, num_classes),
        )

    def init_weights(self, generator: torch.Generator | None = None, gain: float = 0.02) -> PixelMLP:
        for m in self.layers:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, gain, generator=generator)
                nn.init.zeros_(m.bias)
        return self

    def forward(self, x_nc: torch.Tensor) -> torch.Tensor:  # [N, C] -> logits [N, K]
        return self.layers(x_nc)


class EarlyStop:
    """The published stopping rule, fed one training-batch loss at a time.

    From epoch ``from_epoch`` on (0-based; the reference's ``epoch > 3``), a loss below the best so far resets a
    counter, any other loss increments it; training stops when the counter exceeds ``patience`` (50). The best
    loss starts at 1e7 and only losses from ``from_epoch`` on count."""

    def __init__(self, patience: int = 50, from_epoch: int = 4) -> None:
        self.patience, self.from_epoch = patience, from_epoch
        self.best, self.count = 10_000_000.0, 0

    def update(self, epoch: int, loss: float) -> bool:
        """True when training must stop after this batch."""
        if epoch < self.from_epoch:
            return False
        if loss < self.best:
            self.best, self.count = loss, 0
        else:
            self.count += 1
        return self.count > self.patience


def vote(logits_per_model: Sequence[torch.Tensor]) -> torch.Tensor:
    """Ensemble decision per pixel: the mode of the models' argmax labels (ties go to the smallest label,
    as ``torch.mode``). ``logits_per_model``: M tensors ``[N, K]`` -> labels ``[N]``."""
    votes_nm = torch.stack([lg.argmax(1) for lg in logits_per_model], dim=1)  # [N, M]
    return torch.mode(votes_nm, dim=1).values


def class_ious(intersections: np.ndarray, unions: np.ndarray) -> np.ndarray:
    """Per-class IoU from summed counts: ``I_c / (1e-8 + U_c)`` (the reference's formula: a class absent from
    both predictions and labels scores 0)."""
    return intersections / (1e-8 + unions)


def iou_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_label: int = IGNORE_LABEL,
               void_in_eval: str = "ignore") -> tuple[np.ndarray, np.ndarray]:
    """Per-class (intersection, union) pixel counts of one image, ``[K]`` each. ``void_in_eval="ignore"``
    leaves pixels labelled ``ignore_label`` out; "reference" keeps them (predictions there join the union)."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    if void_in_eval == "ignore":
        keep = gt != ignore_label
        pred, gt = pred[keep], gt[keep]
    k = num_classes
    p = np.where(pred < k, pred, k).astype(np.int64)
    g = np.where(gt < k, gt, k).astype(np.int64)
    cm = np.bincount(g * (k + 1) + p, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)[:k, :k]
    inter = np.diag(cm).astype(np.float64)
    pred_count = np.bincount(p, minlength=k + 1)[:k]
    gt_count = np.bincount(g, minlength=k + 1)[:k]
    return inter, (pred_count + gt_count - inter).astype(np.float64)


def drop_small_annotations(label: np.ndarray, num_classes: int, min_pixels: int = 20,
                           ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """A training label map with every class covering 1..``min_pixels - 1`` pixels set to ``ignore_label``
    (the reference removes annotations too small to learn from)."""
    out = label.copy()
    counts = np.bincount(label[label != ignore_label].ravel().astype(np.int64), minlength=num_classes)
    for c in np.nonzero((counts > 0) & (counts < min_pixels))[0]:
        out[label == c] = ignore_label
    return out


def shuffle_split(n_train: int, n_test: int, seed: int, shuffle: bool = True) -> tuple[list[int], list[int]]:
    """One random re-split of a dataset's train + test images, as the reference's ``shuffle_split``: the
    list ``train + test`` (indices ``0..n_train+n_test-1``) shuffled by Python's ``random`` seeded with ``seed``;
    the first ``n_train`` are the training images."""
    order = list(range(n_train + n_test))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order[:n_train], order[n_train:]


class PixelEnsemble:
    """Trained pixel classifiers (a list of :class:`PixelMLP`) plus what they were trained on; save/load as
    one ``.safetensors`` file."""

    def __init__(self, models: Sequence[PixelMLP], info: dict | None = None) -> None:
        if not models:
            raise DifffeatError("an ensemble needs at least one model")
        self.models = [m.eval() for m in models]
        self.info = dict(info or {})

    @property
    def num_classes(self) -> int:
        return self.models[0].num_classes

    @property
    def in_channels(self) -> int:
        return self.models[0].in_channels

    @torch.no_grad()
    def predict(self, x_nc: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Labels ``[N]`` of pixel features ``[N, C]`` by :func:`vote`."""
        if x_nc.shape[1] != self.in_channels:
            raise DifffeatError(f"the classifier was trained on {self.in_channels} channels, got {x_nc.shape[1]}")
        dev = next(self.models[0].parameters()).device
        outs = []
        for s in range(0, x_nc.shape[0], chunk):
            x = x_nc[s:s + chunk].to(dev, torch.float32)
            outs.append(vote([m(x) for m in self.models]).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, dtype=torch.long)

    def save(self, path: str | Path) -> Path:
        from ..io import atomic_path
        from safetensors.torch import save_file

        tensors = {f"model{i}.{k}": v.detach().cpu().contiguous() for i, m in enumerate(self.models)
                   for k, v in m.state_dict().items()}
        meta = {"difffeat": "pixel-ensemble", "models": str(len(self.models)), "in_channels": str(self.in_channels),
                "num_classes": str(self.num_classes), "info": json.dumps(self.info)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> PixelEnsemble:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("difffeat") != "pixel-ensemble":
                    raise DifffeatError(f"{str(path)!r} is not a difffeat pixel classifier (written by `difffeat probe`)")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError) as exc:
            raise DifffeatError(f"cannot read the classifier {str(path)!r}: {exc}") from None
        models = []
        for i in range(int(meta["models"])):
            m = PixelMLP(int(meta["in_channels"]), int(meta["num_classes"]))
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"model{i}.")})
            models.append(m.to(device))
        return cls(models, json.loads(meta.get("info", "{}")))
