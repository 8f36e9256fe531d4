"""GOCA training-free segmentation from cross-attention maps."""

from .aggregation import FixedHeadWeights, GocaHeadReducer
from .postprocess import POSTPROCESS, CrfParams, PamrParams
from .prompts import PromptLayout, TextSegment, build_layout
from .segmenter import Observation, SegmentationResult, Segmenter
from .settings import SegmentSettings, config_names, settings_for
from .vocabulary import ClassCheck, ClassVocabularyWarning, check_class_words, model_vocabulary

__all__ = [
    "Segmenter",
    "SegmentationResult",
    "Observation",
    "FixedHeadWeights",
    "GocaHeadReducer",
    "SegmentSettings",
    "settings_for",
    "config_names",
    "PromptLayout",
    "TextSegment",
    "build_layout",
    "POSTPROCESS",
    "PamrParams",
    "CrfParams",
    "check_class_words",
    "model_vocabulary",
    "ClassCheck",
    "ClassVocabularyWarning",
]
