"""Shared helpers for tests (not fixtures: those live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

import difffeat
from difffeat.testing import TINY_FAMILIES

#: every tiny pipeline of :mod:`difffeat.testing` (its builders are keyed by family name; variants such as
#: ``sd35`` load as their family's adapter): what the family-parametrised tests run over. A new family joins
#: them by registering its adapter and its tiny builder (``tests/test_conformance.py`` checks both exist).
FAMILIES: tuple[str, ...] = tuple(TINY_FAMILIES)
#: text tokens per family in tests (Lumina 2's sequence holds its system prompt, ~31 tiny tokens); default 32
TEST_TEXT_LENGTH = {"lumina2": 64}
_BACKBONES: dict[str, difffeat.Backbone] = {}
_TINY: dict[str, object] = {}


def tiny(name: str):
    """The test session's tiny pipeline ``name`` (built once; the ``tiny_pipes`` fixture serves the same)."""
    if name not in _TINY:
        from difffeat.testing import tiny_pipeline

        _TINY[name] = tiny_pipeline(name)
    return _TINY[name]


@dataclass(frozen=True)
class FamilySpec:
    """Everything one registered family brings, derived from the registry and the shipped data.

    Attributes:
        family: the adapter's family name.
        adapter: the :class:`~difffeat.Backbone` subclass registered for it.
        hook_table: its hook table's name (``hooks/<name>.yaml``).
        tiny: the tiny pipelines of :mod:`difffeat.testing` that load as this family (its own first).
        presets: feature presets of the family.
        goca_config: ``configs/goca/<family>.yaml``, or None.
        architectures: real-size configs (``configs/architectures``) whose pipeline the adapter serves.
    """

    family: str
    adapter: type
    hook_table: str
    tiny: tuple[str, ...]
    presets: tuple[str, ...]
    goca_config: Path | None
    architectures: tuple[str, ...]


@lru_cache(maxsize=None)
def tiny_family(name: str) -> str:
    """The registered family a tiny pipeline loads as."""
    from difffeat.backbones import adapter_for

    return adapter_for(tiny(name)).family


@lru_cache(maxsize=None)
def family_specs() -> dict[str, FamilySpec]:
    """One :class:`FamilySpec` per registered family, in registration order (builds every tiny pipeline once)."""
    from difffeat.architectures import architecture, architecture_names
    from difffeat.backbones import FAMILIES as ADAPTERS
    from difffeat.backbones.registry import adapter_named
    from difffeat.presets import list_presets, load_preset
    from difffeat.resources import data_dir

    presets = [load_preset(n) for n in list_presets()]
    archs = {name: adapter_named(architecture(name)["pipeline"]).family for name in architecture_names()}
    specs = {}
    for family, adapter in ADAPTERS.items():
        goca = data_dir("configs") / "goca" / f"{family}.yaml"
        tinies = sorted((n for n in FAMILIES if tiny_family(n) == family), key=lambda n: (n != family, n))
        specs[family] = FamilySpec(
            family=family,
            adapter=adapter,
            hook_table=adapter.hook_table,
            tiny=tuple(tinies),
            presets=tuple(p.name for p in presets if p.family == family),
            goca_config=goca if goca.is_file() else None,
            architectures=tuple(a for a, f in archs.items() if f == family),
        )
    return specs


def backbone_for(tiny_pipes, family: str) -> difffeat.Backbone:
    """One Backbone per family per test session (its catalog is cached on it)."""
    if family not in _BACKBONES:
        backbone = difffeat.load(tiny_pipes(family) if tiny_pipes is not None else tiny(family), device="cpu", dtype="fp32")
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


def decision_margin(result) -> np.ndarray:
    """``[H, W]``: how far each pixel's winning score of a :class:`~difffeat.SegmentationResult` lies above the
    runner-up, on the label grid (the scores {background, classes} upsampled bilinearly, as labels are decided)."""
    import torch
    import torch.nn.functional as F

    stack = torch.cat([result.background[None], result.class_maps]).float()[None]  # [1, 1 + n, h, w]
    full = F.interpolate(stack, size=result.labels.shape, mode="bilinear", align_corners=False)[0]
    top2 = full.topk(2, dim=0).values if len(full) > 1 else torch.cat([full, torch.full_like(full, -torch.inf)])
    return (top2[0] - top2[1]).numpy()


def tie_tolerance(a, b, noise: float = 1e-3) -> float:
    """How close to a tie ``a``'s decision must be for float noise to flip it in ``b``: bilinear upsampling is a
    convex combination, so scores that differ by at most ``delta`` on the map grid differ by at most ``delta`` on
    the label grid, and a winner can change only where its margin is at most ``2 * delta`` (+ the upsampling's own
    rounding). Fails when the scores differ by more than ``noise``: then they come from different computations,
    not from rounding, and no tie argument applies."""
    import torch

    assert a.class_maps.shape == b.class_maps.shape and a.labels.shape == b.labels.shape
    delta = max(float((a.class_maps - b.class_maps).abs().max()), float((a.background - b.background).abs().max()))
    assert delta <= noise, f"scores differ by {delta:.3g} > {noise:g}: not float noise"
    return 2 * delta + 4 * float(torch.finfo(torch.float32).eps)


def tie_pixels(a, b, noise: float = 1e-3) -> int:
    """The number of pixels whose label float noise may flip between results ``a`` and ``b``."""
    return int((decision_margin(a) <= tie_tolerance(a, b, noise)).sum())


def assert_labels_differ_only_at_ties(a, b, noise: float = 1e-3) -> None:
    """Two results whose scores differ by float noise (at most ``noise``): their labels may differ only at pixels
    where ``a``'s decision is a tie within that noise (:func:`tie_tolerance`)."""
    tol = tie_tolerance(a, b, noise)
    differ = a.labels != b.labels
    margin = decision_margin(a)
    assert (margin[differ] <= tol).all(), f"{int(differ.sum())} labels differ, margins {np.sort(margin[differ])[-3:]} > {tol:.3g}"


def assert_close_to_rounding(got, want, exact, factor: float = 4.0, msg: str = "") -> None:
    """``got`` and ``want``, two computations of one network in the same low precision that may round
    differently (other kernels, allocations, thread counts), agree within ``factor`` times the rounding error
    that ``want`` itself carries against ``exact``, the float64 recomputation; plus a few ulps of the magnitude,
    for values that happen to round exactly. Fails on any real difference (weights, config, wiring), which is
    far above rounding."""
    import torch

    eps = float(torch.finfo(want.dtype).eps)  # the low-precision side's unit roundoff
    got, want, exact = got.double(), want.double(), exact.double()
    rounding = float((want - exact).abs().max())
    tol = factor * rounding + 4 * eps * float(exact.abs().max())
    diff = float((got - want).abs().max())
    assert diff <= tol, f"{msg}: max |got - want| = {diff:.3g} > {tol:.3g} ({factor} x fp32 rounding {rounding:.3g})"
    assert float((got - exact).abs().max()) <= (factor + 1) * rounding + 4 * eps * float(exact.abs().max()), msg
