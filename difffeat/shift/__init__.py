"""Content-shift suppression (GATE): techniques as extraction options, and the GATE tests."""

from .gate import Img2ImgComparison, gate_img2img, gate_scores, laplacian_diff, laplacian_score
from .report import GateReport, default_gate_features, run_gate
from .techniques import QUALITY_WORDS, TASK_PROMPTS, ControlNet, Lora, Prompt, Technique, canny_edges, parse_technique
from .combined import CombinedExtractor, parse_variants
from .variants import extract_variants

__all__ = [
    "Technique", "Prompt", "ControlNet", "Lora", "QUALITY_WORDS", "TASK_PROMPTS", "canny_edges", "parse_technique",
    "extract_variants", "laplacian_diff", "laplacian_score", "gate_scores", "gate_img2img", "Img2ImgComparison",
    "GateReport", "default_gate_features", "run_gate", "CombinedExtractor", "parse_variants",
]
