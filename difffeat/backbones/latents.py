"""Latent reuse: each image is VAE-encoded once, however many forwards use it.

A :class:`LatentCache` maps an image's preprocessed pixels (a digest of the exact ``[3, H, W]`` tensor the VAE
would see, so resolution and resizing are part of the key) plus the VAE's identity, dtype and device to its
scaled latents. :meth:`Backbone.reusing_latents` activates one for a block of work (a fresh one per call, as
the feature extractor's ``map_prompt`` pass and multi-setting observations do); passing the same cache to
every run (``backbone.latent_cache = LatentCache()``) reuses latents across runs over the same images.
Results are unchanged: a hit returns the latents the same encode produced (the VAE is deterministic: the
posterior's mean).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

__all__ = ["LatentCache"]


def _digest(pixels_chw: torch.Tensor) -> str:
    return hashlib.sha1(pixels_chw.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class LatentCache:
    """Latents by image, in memory (least recently used dropped beyond ``max_items``).

    Attributes:
        hits / misses: images served from the cache / encoded.
    """

    def __init__(self, max_items: int | None = 256) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def encode(self, pixels_bchw: torch.Tensor, vae_key: tuple, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Latents ``[B, c, h, w]`` of ``pixels_bchw``: cached images from the cache, the others through one
        ``encode`` call on just those images."""
        keys = [(_digest(p), tuple(p.shape), *vae_key) for p in pixels_bchw]
        todo = [i for i, k in enumerate(keys) if k not in self._items]
        fresh = {}
        if todo:
            # duplicates within the batch are encoded once as well
            first = list(dict.fromkeys(keys[i] for i in todo))
            index = {k: next(i for i in todo if keys[i] == k) for k in first}
            out = encode(pixels_bchw[[index[k] for k in first]])
            fresh = {k: out[i : i + 1].clone() for i, k in enumerate(first)}  # [1, c, h, w], the encoder's strides
        self.misses += len(fresh)
        self.hits += len(keys) - len(fresh)
        parts = []
        for k in keys:
            if k in fresh:
                self._items[k] = fresh[k]
            self._items.move_to_end(k)
            parts.append(self._items[k])
        while self.max_items is not None and len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return torch.cat(parts)  # keeps the encoder's memory format (the denoiser's convs see the same input)
