"""Extracting several technique variants in one call and combining them (the paper learns per-channel
weights across variants in its downstream head; concatenation and the mean are the training-free forms)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..features import FeatureExtractor
from .techniques import Technique


COMBINE = ("none", "concat", "mean")


def extract_variants(
    extractor: FeatureExtractor,
    images: Sequence,
    prompts: str | Sequence[str],
    variants: Mapping[str, Sequence[Technique]],
    combine: str = "none",
) -> dict[str, torch.Tensor]:
    """Features of every variant (``{variant: [techniques]}``; ``[]`` = plain extraction).

    Returns keys ``"<variant>/<name>"`` (``combine="none"``), or one key per feature name holding the
    channel concatenation (``"concat"``, variants in the given order) or the mean (``"mean"``) over variants.
    """
    if combine not in COMBINE:
        raise ValueError(f"combine={combine!r} is not one of {COMBINE}")
    if not variants:
        raise ValueError("no variants given")
    per_variant: dict[str, dict[str, torch.Tensor]] = {}
    base_techniques = extractor.techniques
    try:
        for variant, techniques in variants.items():
            extractor.techniques = list(techniques)
            per_variant[variant] = extractor(images, prompts)
    finally:
        extractor.techniques = base_techniques
    if combine == "none":
        return {f"{v}/{name}": t for v, feats in per_variant.items() for name, t in feats.items()}
    out = {}
    for name in extractor.names:
        stack = [per_variant[v][name] for v in variants]
        out[name] = torch.cat(stack, dim=1) if combine == "concat" else torch.stack(stack).mean(0)
    return out
