"""GOCA training-free segmentation from cross-attention maps."""

from .prompts import PromptLayout, TextSegment, build_layout
from .segmenter import SegmentationResult, Segmenter
from .settings import SegmentSettings, settings_for

__all__ = ["Segmenter", "SegmentationResult", "SegmentSettings", "settings_for", "PromptLayout", "TextSegment", "build_layout"]
