"""GOCA training-free segmentation from cross-attention maps."""

from .aggregation import FixedHeadWeights, GocaHeadReducer
from .postprocess import POSTPROCESS, CrfParams, PamrParams
from .prompts import PromptLayout, TextSegment, build_layout
from .segmenter import Observation, SegmentationResult, Segmenter
from .settings import SegmentSettings, config_names, settings_for
from .vocabulary import ClassCheck, ClassVocabularyWarning, check_class_words, model_vocabulary

# Segmenter, SegmentationResult, SegmentSettings, TextSegment, check_class_words and ClassVocabularyWarning are
# exported from the package facade (``difffeat.Segmenter`` ...); the imports above keep these paths working.
__all__ = [
    "Observation",
    "FixedHeadWeights",
    "GocaHeadReducer",
    "settings_for",
    "config_names",
    "PromptLayout",
    "build_layout",
    "POSTPROCESS",
    "PamrParams",
    "CrfParams",
    "model_vocabulary",
    "ClassCheck",
]
