"""Several extractions in one call, combined as the published code combines them.

The content-shift paper extracts one feature per technique variant (a fine-grained prompt; ControlNet from a
few steps earlier; each LoRA) and feeds the downstream head their channel concatenation; DIFT averages features
over differently noised copies; hyperfeature methods concatenate timesteps. :class:`CombinedExtractor` is a
:class:`~difffeat.features.FeatureExtractor` whose every forward runs each variant x timestep, averaged over
``ensemble`` noise seeds, and returns per activation name the channel concatenation ``[B, sum C, H, W]``
(variants outer, timesteps inner), so every consumer of a FeatureExtractor (``extract``, ``probe``,
``correspond``, the run engine) takes it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import DifffeatError, InvalidOptionError
from ..features import FeatureExtractor
from .techniques import Technique, parse_technique

__all__: list[str] = []  # CombinedExtractor, parse_variants: exported by difffeat.shift


def parse_variants(specs: Sequence[str]) -> dict[str, list[Technique]]:
    """``--technique`` values -> ``{spec: [techniques]}``: each value is one variant (the reference's separate
    feature); ``+`` joins techniques applied together in one forward (``prompt:quality=natural+controlnet:ID``)."""
    out: dict[str, list[Technique]] = {}
    for spec in specs:
        if spec in out:
            raise InvalidOptionError(f"--technique {spec!r} is given twice")
        parts = [p for p in spec.split("+") if p.strip()]
        if not parts:
            raise InvalidOptionError("empty --technique; e.g. prompt:quality=natural, controlnet:ID,start=published, lora:FILE")
        out[spec] = [parse_technique(p.strip()) for p in parts]
    return out


class CombinedExtractor(FeatureExtractor):
    """A FeatureExtractor over technique ``variants`` ({label: [techniques]}; ``[]`` = plain), ``timesteps``
    and an ``ensemble`` of noise seeds (``seed``, ``seed + 1``, ...), combined per activation name: the mean over
    seeds, then the channel concatenation over variants x timesteps. Other arguments as FeatureExtractor."""

    def __init__(self, backbone, features=None, *, variants: Mapping[str, Sequence[Technique]] | None = None,
                 timesteps: Sequence[int] | None = None, ensemble: int = 1, **kwargs) -> None:
        if kwargs.get("techniques"):
            raise DifffeatError("give CombinedExtractor its techniques as variants={label: [techniques]}")
        super().__init__(backbone, features, **kwargs)
        self.variants = {k: list(v) for k, v in (variants or {"plain": []}).items()}
        if not self.variants:
            raise InvalidOptionError("no variants given")
        from ..backbones.base import check_timestep

        self.timesteps = [check_timestep(int(t)) for t in (timesteps or [self.t])]
        if len(set(self.timesteps)) != len(self.timesteps):
            raise InvalidOptionError(f"timesteps repeat: {self.timesteps}")
        if isinstance(ensemble, bool) or not isinstance(ensemble, int) or not 1 <= ensemble <= 64:
            raise InvalidOptionError(f"ensemble must be an integer in 1..64, got {ensemble!r}")
        self.ensemble = ensemble

    def settings(self) -> dict:
        s = super().settings()
        s.update(techniques=[], variants={k: [t.describe() for t in v] for k, v in self.variants.items()},
                 timesteps=self.timesteps, ensemble=self.ensemble)
        return s

    def _technique_prompts(self, prompts: list[str]) -> list[str]:
        return list(prompts)  # each variant rewrites the prompts itself (in _forward)

    def _forward(self, images, prompts: list[str]) -> dict[str, torch.Tensor]:
        saved = (self.techniques, self.t, self.seed)
        parts: list[dict[str, torch.Tensor]] = []
        try:
            for techniques in self.variants.values():
                self.techniques = techniques
                rewritten = FeatureExtractor._technique_prompts(self, list(prompts))
                for t in self.timesteps:
                    self.t = t
                    acc: dict[str, torch.Tensor] = {}
                    for k in range(self.ensemble):
                        self.seed = saved[2] + k
                        for n, v in super()._forward(images, rewritten).items():
                            acc[n] = acc[n] + v if n in acc else v.clone()
                    parts.append({n: v / self.ensemble if self.ensemble > 1 else v for n, v in acc.items()})
        finally:
            self.techniques, self.t, self.seed = saved
        return {n: torch.cat([p[n] for p in parts], dim=1) for n in self.names}
