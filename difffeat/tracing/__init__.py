"""Tracing a generation (GOCA maps and features of an ordinary pipeline call) and S-CFG guidance."""

from .scfg import GUIDANCE_MODES, SCFG, guided_prediction, published_smoothing_kernel, scfg_rate, token_masks
from .session import ClassNotInPromptWarning, Trace, trace

__all__ = [
    "trace",
    "Trace",
    "SCFG",
    "GUIDANCE_MODES",
    "ClassNotInPromptWarning",
    "scfg_rate",
    "guided_prediction",
    "token_masks",
    "published_smoothing_kernel",
]
