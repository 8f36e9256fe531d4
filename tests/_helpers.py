"""Shared helpers for tests (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import numpy as np
from PIL import Image

import difffeat

FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux")
_BACKBONES: dict[str, difffeat.Backbone] = {}


def backbone_for(tiny_pipes, family: str) -> difffeat.Backbone:
    """One Backbone per family per test session (its catalog is cached on it)."""
    if family not in _BACKBONES:
        backbone = difffeat.load(tiny_pipes(family), device="cpu", dtype="fp32")
        if hasattr(backbone, "max_sequence_length"):
            backbone.max_sequence_length = 32  # T5 families: keep the text short for speed
        _BACKBONES[family] = backbone
    return _BACKBONES[family]


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (scripts, not a package) as a module. The scripts share nothing but
    the library (none imports another), so no folder goes on ``sys.path``."""
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def attention_modules(denoiser):
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in denoiser.named_modules() if hasattr(m, "processor") and hasattr(m, "to_q")]
