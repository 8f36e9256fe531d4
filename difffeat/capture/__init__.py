"""Activation capture: forward hooks and attention observers with a guaranteed lifetime."""

from .observer import AttentionTensors, MapReducer, attention_maps, attention_probs, head_mean, per_head, register_layout
from .session import Capture, StopForward, sequence_to_spatial
from .probe import catalog_of, probe_shapes

# Capture and catalog_of: listed by the facade (difffeat)
__all__ = [
    "probe_shapes",
    "StopForward",
    "sequence_to_spatial",
    "AttentionTensors",
    "MapReducer",
    "attention_maps",
    "attention_probs",
    "head_mean",
    "per_head",
    "register_layout",
]
