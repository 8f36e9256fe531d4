"""difffeat: pretrained diffusion models as feature extractors and training-free segmenters."""

from __future__ import annotations

__version__ = "0.1.0"
