"""Activation capture: forward hooks and attention observers with a guaranteed lifetime."""

from .observer import AttentionTensors, MapReducer, attention_probs, head_mean, per_head, register_layout
from .session import Capture, StopForward, sequence_to_spatial
from .probe import catalog_of, probe_shapes

__all__ = [
    "Capture",
    "catalog_of",
    "probe_shapes",
    "StopForward",
    "sequence_to_spatial",
    "AttentionTensors",
    "MapReducer",
    "attention_probs",
    "head_mean",
    "per_head",
    "register_layout",
]
