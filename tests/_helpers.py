"""Shared helpers for tests (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import numpy as np
from PIL import Image

import difffeat

FAMILIES = ("sd", "sdxl", "pixart", "sd3", "sd35", "flux", "flux2", "qwenimage", "chroma")
FAMILIES += ("hunyuandit", "zimage")  # branch hunyuan
FAMILIES += ("sana", "lumina2")  # Gemma-encoded families
FAMILIES += ("longcatimage", "ovisimage", "krea2", "hunyuanimage", "briafibo", "ideogram4", "cogview4", "hidream")  # 2026 families
#: text tokens per family in tests (Lumina 2's sequence holds its system prompt, ~31 tiny tokens); default 32
TEST_TEXT_LENGTH = {"lumina2": 64}
_BACKBONES: dict[str, difffeat.Backbone] = {}


def backbone_for(tiny_pipes, family: str) -> difffeat.Backbone:
    """One Backbone per family per test session (its catalog is cached on it)."""
    if family not in _BACKBONES:
        backbone = difffeat.load(tiny_pipes(family), device="cpu", dtype="fp32")
        if hasattr(backbone, "max_sequence_length"):
            backbone.max_sequence_length = TEST_TEXT_LENGTH.get(family, 32)  # keep the text short for speed
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


class SDPARecorder:
    """Test-side record of every ``scaled_dot_product_attention`` call inside the given attention modules:
    ``calls[path]`` = (query, key, value, attn_mask, output), ``[B, heads, N, d]``. Written independently of
    difffeat's observer so tests can check its maps against what the kernel really computed."""

    def __init__(self, denoiser, paths):
        import torch
        from torch.overrides import TorchFunctionMode

        calls = self.calls = {}

        class Mode(TorchFunctionMode):
            def __init__(self, path):
                super().__init__()
                self.path = path

            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func is torch.nn.functional.scaled_dot_product_attention and self.path not in calls:
                    names = ("query", "key", "value", "attn_mask")
                    bound = {**dict(zip(names, args)), **kwargs}
                    calls[self.path] = (bound["query"], bound["key"], bound["value"], bound.get("attn_mask"), out)
                return out

        self._handles, self._modes = [], {}
        for path in paths:
            module = denoiser.get_submodule(path)

            def enter(m, a, path=path):
                self._modes[path] = Mode(path)
                self._modes[path].__enter__()

            def leave(m, a, o, path=path):
                self._modes.pop(path).__exit__(None, None, None)

            self._handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]

    def remove(self):
        for h in self._handles:
            h.remove()
