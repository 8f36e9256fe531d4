"""The feature extractor a dataset command runs: plain, or combined over ``--technique`` variants,
``--timesteps`` and an ``--ensemble-size`` of noise seeds (:class:`~difffeat.shift.combined.CombinedExtractor`).
:func:`check_extraction` parses and checks those options before any model loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_number, split_names
from ..errors import InvalidOptionError

__all__ = ["ExtractionOptions", "check_extraction", "make_extractor"]


@dataclass
class ExtractionOptions:
    """Parsed ``--technique`` / ``--timesteps`` / ``--ensemble-size`` options."""

    variants: dict[str, list] = field(default_factory=dict)
    timesteps: list[int] = field(default_factory=list)
    ensemble: int = 1

    @property
    def combined(self) -> bool:
        return bool(self.variants) or len(self.timesteps) > 1 or self.ensemble > 1


def check_extraction(model: Any, techniques: Sequence[str] | None = None, timesteps: str | Sequence[int] | None = None,
                     ensemble: int = 1) -> ExtractionOptions:
    """Parse the options (unknown technique, bad timestep, LoRA of another family: one-line errors, no load)."""
    from ..shift.combined import parse_variants
    from ..shift.lora_check import check_lora_fits
    from ..shift.techniques import Lora

    ts = []
    for v in split_names(timesteps) if isinstance(timesteps, str) else list(timesteps or []):
        try:
            ts.append(int(v))
        except ValueError:
            raise InvalidOptionError(f"--timesteps takes integers 0-999 separated by commas, got {v!r}") from None
        check_number("--timesteps", ts[-1], 0, 999, integer=True)
    check_number("--ensemble-size", ensemble, 1, 64, integer=True)
    variants = parse_variants(list(techniques or []))
    for techs in variants.values():
        for tech in techs:
            if isinstance(tech, Lora):
                check_lora_fits(tech.weights, model)
    return ExtractionOptions(variants, ts, int(ensemble))


def make_extractor(backbone, names: Sequence[str] | None, options: ExtractionOptions, **kwargs):
    """A FeatureExtractor (``kwargs``: preset, t, resolution, square, seed, batch_size), combined when the
    options ask for variants, several timesteps or a seed ensemble."""
    from ..features import FeatureExtractor

    if not options.combined:
        if options.timesteps:
            kwargs["t"] = options.timesteps[0]
        return FeatureExtractor(backbone, names or None, **kwargs)
    from ..shift.combined import CombinedExtractor

    return CombinedExtractor(backbone, names or None, variants=options.variants or None,
                             timesteps=options.timesteps or None, ensemble=options.ensemble, **kwargs)
