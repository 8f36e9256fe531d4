"""Linear probes: how much per-pixel semantic information a feature map holds.

The activation-harvesting paper ranks features by training a light head on frozen features; the simplest
such head is a per-pixel softmax regression. :class:`PixelProbe` fits one (L-BFGS, full batch on a random
subset of pixels per image, standardised inputs, small L2 penalty) and scores it with pixel accuracy and mIoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DifffeatError
from .metrics import IGNORE, ConfusionMatrix


@dataclass(frozen=True)
class ProbeScore:
    """Test-set quality of a probe."""

    pixel_accuracy: float
    miou: float

    def to_json(self) -> dict[str, float]:
        return {"pixel_accuracy": self.pixel_accuracy, "miou": self.miou}


def _check(features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.ndim != 4 or labels.ndim != 3 or features.shape[0] != labels.shape[0] or features.shape[2:] != labels.shape[1:]:
        raise DifffeatError(
            f"features must be [B, C, H, W] and labels [B, H, W] on the same grid; got {tuple(features.shape)} "
            f"and {tuple(labels.shape)} (upsample the features to the label size first, e.g. with upsample_concat)"
        )


class PixelProbe:
    """Per-pixel multinomial logistic regression on ``[B, C, H, W]`` features.

    Args:
        num_classes: number of labels (0..num_classes-1).
        pixels_per_image: random pixels taken from each training image (all pixels when larger than H*W).
        l2: weight of the L2 penalty on the weights.
        max_iter: L-BFGS iterations.
        seed: pixel sampling seed.
    """

    def __init__(self, num_classes: int, pixels_per_image: int = 512, l2: float = 1e-4, max_iter: int = 200, seed: int = 0) -> None:
        if num_classes < 2:
            raise DifffeatError(f"a probe needs at least 2 classes, got {num_classes}")
        self.num_classes, self.pixels_per_image, self.l2, self.max_iter, self.seed = num_classes, pixels_per_image, l2, max_iter, seed
        self.linear: torch.nn.Linear | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> PixelProbe:
        """Fit on ``features [B, C, H, W]`` and integer ``labels [B, H, W]``; returns ``self``."""
        _check(features, labels)
        b, c, h, w = features.shape
        g = torch.Generator().manual_seed(self.seed)
        k = min(self.pixels_per_image, h * w)
        flat = features.float().permute(0, 2, 3, 1).reshape(b, h * w, c)
        lab = labels.reshape(b, h * w).long()
        valid = lab != IGNORE
        if bool(valid.all()):
            idx = torch.stack([torch.randperm(h * w, generator=g)[:k] for _ in range(b)])  # [B, k]
            x = torch.gather(flat, 1, idx[..., None].expand(-1, -1, c)).reshape(-1, c)
            y = torch.gather(lab, 1, idx).reshape(-1)
        else:  # pixels labelled IGNORE (255) are never sampled
            picks = [torch.nonzero(valid[i]).flatten() for i in range(b)]
            picks = [p[torch.randperm(len(p), generator=g)[:k]] for p in picks]
            x = torch.cat([flat[i, p] for i, p in enumerate(picks)])
            y = torch.cat([lab[i, p] for i, p in enumerate(picks)])
            if not len(y):
                raise DifffeatError(f"every pixel is labelled {IGNORE} (ignore); nothing to fit")
        if int(y.max()) >= self.num_classes or int(y.min()) < 0:
            raise DifffeatError(f"labels must lie in [0, {self.num_classes - 1}] or be {IGNORE} (ignored), found {int(y.min())}..{int(y.max())}")
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        xs = (x - self.mean) / self.std
        torch.manual_seed(self.seed)
        linear = torch.nn.Linear(c, self.num_classes)
        opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(linear(xs), y) + self.l2 * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.linear = linear.requires_grad_(False)
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Label map ``[B, H, W]`` for ``features [B, C, H, W]``."""
        if self.linear is None:
            raise DifffeatError("the probe is not fitted; call fit(features, labels) first")
        b, c, h, w = features.shape
        if c != self.linear.in_features:
            raise DifffeatError(f"the probe was fitted on {self.linear.in_features} channels, got {c}")
        x = (features.float().permute(0, 2, 3, 1).reshape(-1, c) - self.mean) / self.std
        return self.linear(x).argmax(1).reshape(b, h, w)

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> ProbeScore:
        """Pixel accuracy and mIoU (over classes present in labels or predictions) on a test set; pixels labelled
        255 are ignored."""
        _check(features, labels)
        pred = self.predict(features)
        cm = ConfusionMatrix(self.num_classes)
        cm.update(labels.long().cpu().numpy(), pred.cpu().numpy())
        keep = labels.long() != IGNORE  # 255 pixels count in neither score
        return ProbeScore(pixel_accuracy=float((pred == labels.long())[keep].float().mean()), miou=float(cm.miou()))


def probe_score(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int, pixels_per_image: int = 512, seed: int = 0,
) -> ProbeScore:  # fmt: skip
    """Fit a :class:`PixelProbe` on the training features and score it on the test features."""
    probe = PixelProbe(num_classes, pixels_per_image=pixels_per_image, seed=seed).fit(train_features, train_labels)
    return probe.score(test_features, test_labels)
