"""Tracing a generation (GOCA maps and features of an ordinary pipeline call) and S-CFG guidance."""

from .scfg import GUIDANCE_MODES, SCFG, guided_prediction, published_smoothing_kernel, scfg_rate, token_masks
from .session import AGGREGATES, ClassNotInPromptWarning, Trace, trace

# trace, Trace and SCFG are listed by the facade (their canonical path is ``difffeat``)
__all__ = [
    "GUIDANCE_MODES",
    "AGGREGATES",
    "ClassNotInPromptWarning",
    "scfg_rate",
    "guided_prediction",
    "token_masks",
    "published_smoothing_kernel",
]
