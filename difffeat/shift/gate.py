"""GATE: cheap tests of whether a generation technique suppresses content shift, before adopting it.

* :func:`laplacian_score` (quantitative): with ``F_ref`` the feature at t=0,
  ``diff(F) = sum_ij | ||Lap(F_ref)_ij||_2 - ||Lap(F)_ij||_2 |`` (Laplacian over space, norm over channels)
  and ``score = (diff(anchor) - diff(F)) / diff(anchor)``; the anchor is plain extraction at t. 1 = no shift,
  <= 0 = no better than the anchor.
* :func:`gate_img2img` (qualitative): img2img at high strength with and without the technique; the output
  closer to the input wins. Returns both images side by side and a similarity-to-input figure for each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError
from ..features import FeatureExtractor
from ..images import to_rgb
from .techniques import ControlNet, Lora, Prompt, Technique, canny_edges

__all__ = ["laplacian_norm", "psnr"]

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_norm(f_bchw: torch.Tensor) -> torch.Tensor:
    """``||Lap(F)_ij||_2`` over channels: ``[B, C, H, W]`` -> ``[B, H, W]`` (replicate padding)."""
    c = f_bchw.shape[1]
    kernel = _LAPLACE.to(f_bchw).view(1, 1, 3, 3).repeat(c, 1, 1, 1)
    lap = F.conv2d(F.pad(f_bchw.float(), (1, 1, 1, 1), mode="replicate"), kernel.float(), groups=c)
    return lap.norm(dim=1)


def laplacian_diff(f_ref: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``sum_ij | ||Lap(F_ref)_ij|| - ||Lap(F)_ij|| |`` per image: ``[B]``."""
    return (laplacian_norm(f_ref) - laplacian_norm(f)).abs().flatten(1).sum(1)


def laplacian_score(f_ref: torch.Tensor, f_anchor: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """GATE score per image ``[B]``: 1 when ``f`` matches the reference's Laplacian structure, 0 for the
    anchor itself, negative when worse than the anchor."""
    anchor = laplacian_diff(f_ref, f_anchor)
    return (anchor - laplacian_diff(f_ref, f)) / anchor.clamp_min(1e-12)


GATE_REFERENCES = ("plain", "treated")


def gate_scores(
    extractor: FeatureExtractor,
    images: Sequence[Any],
    prompts: str | Sequence[str],
    techniques: Sequence[Technique],
    reference_t: int = 0,
    reference: str = "plain",
) -> dict[str, float]:
    """Mean GATE Laplacian score of ``techniques`` against plain extraction, per activation of ``extractor``.

    The anchor is plain extraction at the extractor's t. The reference is extraction at ``reference_t``
    (0: the cleanest reconstruction): ``reference="plain"`` (the paper's form) uses plain extraction there, so
    the score also counts how much the technique changes the features at all; ``reference="treated"`` compares
    each side with its *own* clean version (plain at t vs plain at ``reference_t``, treated at t vs treated at
    ``reference_t``), so it measures only how much noise-induced drift the technique removes.
    """
    if reference not in GATE_REFERENCES:
        raise ConfigError(f"unknown GATE reference {reference!r}; choose one of {', '.join(GATE_REFERENCES)}")
    saved_t, saved_tech = extractor.t, extractor.techniques
    try:
        extractor.techniques = []
        anchor = extractor(images, prompts)
        extractor.t = reference_t
        plain_ref = extractor(images, prompts)
        extractor.techniques = list(techniques)
        treated_ref = extractor(images, prompts) if reference == "treated" else plain_ref
        extractor.t = saved_t
        treated = extractor(images, prompts)
    finally:
        extractor.t, extractor.techniques = saved_t, saved_tech
    scores = {}
    for name in extractor.names:  # with reference="plain", treated_ref is plain_ref: laplacian_score's formula
        anchor_diff = laplacian_diff(plain_ref[name], anchor[name])
        treated_diff = laplacian_diff(treated_ref[name], treated[name])
        scores[name] = float(((anchor_diff - treated_diff) / anchor_diff.clamp_min(1e-12)).mean())
    return scores


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio (dB) between two RGB images of the same size."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB").resize(a.size), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _edge_iou(a: Image.Image, b: Image.Image) -> float:
    ea = np.asarray(canny_edges(a))[..., 0] > 0
    eb = np.asarray(canny_edges(b.resize(a.size)))[..., 0] > 0
    # tolerate one-pixel displacement
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    da = cv2.dilate(ea.astype(np.uint8), kernel) > 0
    db = cv2.dilate(eb.astype(np.uint8), kernel) > 0
    union = (da | db).sum()
    return float((da & db).sum() / union) if union else 1.0


@dataclass
class Img2ImgComparison:
    """img2img outputs without (reference) and with the technique, and their similarity to the input."""

    input: Image.Image
    reference: Image.Image
    treated: Image.Image
    psnr_reference: float
    psnr_treated: float
    edge_iou_reference: float
    edge_iou_treated: float

    @property
    def technique_helps(self) -> bool:
        """Whether the output with the technique is closer to the input (higher PSNR) than the one without:
        the technique suppressed content shift on this image. Edge IoU is reported beside it, not used."""
        return self.psnr_treated > self.psnr_reference

    def verdict(self) -> str:
        """One sentence: which output stays closer to the input, by how much, and whether edge IoU agrees."""
        d = self.psnr_treated - self.psnr_reference
        edges = self.edge_iou_treated - self.edge_iou_reference
        if self.technique_helps:
            head = f"The technique helps here: with it the output is closer to the input (PSNR {d:+.2f} dB)"
        else:
            head = (f"The technique does not help here: with it the output is no closer to the input (PSNR {d:+.2f} dB), "
                    "so it did not suppress content shift on this image")
        agree = (edges > 0) == self.technique_helps
        return f"{head}; the edge IoU ({edges:+.3f}) {'agrees' if agree else 'disagrees'}."

    def table(self) -> list[tuple[str, str, str, str]]:
        """Rows ``(measure, without, with, closer to the input)`` of the two similarity measures, for display."""
        def closer(without: float, with_: float) -> str:
            return "with" if with_ > without else "without" if without > with_ else "tie"

        return [("PSNR to the input (dB, higher = closer)", f"{self.psnr_reference:.2f}", f"{self.psnr_treated:.2f}",
                 closer(self.psnr_reference, self.psnr_treated)),
                ("edge IoU with the input (0-1)", f"{self.edge_iou_reference:.3f}", f"{self.edge_iou_treated:.3f}",
                 closer(self.edge_iou_reference, self.edge_iou_treated))]

    def side_by_side(self) -> Image.Image:
        w, h = self.input.size
        canvas = Image.new("RGB", (3 * w, h), "white")
        for i, img in enumerate((self.input, self.reference, self.treated)):
            canvas.paste(img.convert("RGB").resize((w, h)), (i * w, 0))
        return canvas

    def to_json(self) -> dict[str, float]:
        return {"psnr_reference": self.psnr_reference, "psnr_treated": self.psnr_treated,
                "edge_iou_reference": self.edge_iou_reference, "edge_iou_treated": self.edge_iou_treated,
                "technique_helps": bool(self.technique_helps)}


def gate_img2img(
    backbone: Any, image: Any, prompt: str, technique: Technique, strength: float = 0.75, steps: int = 20, seed: int = 0,
    resolution: int | None = None,
) -> Img2ImgComparison:
    """Run img2img at ``strength`` with and without ``technique`` (diffusers' img2img pipelines, built from the
    loaded components) and compare each output to the input."""
    from diffusers import AutoPipelineForImage2Image

    rgb = to_rgb(image)
    res = resolution or backbone.native_resolution
    from ..images import resize_to_multiple

    rgb = resize_to_multiple(rgb, res, backbone.size_multiple)
    pipe = AutoPipelineForImage2Image.from_pipe(backbone.pipeline)
    pipe.set_progress_bar_config(disable=True)

    def run(p, prompt_text, **kw):
        gen = torch.Generator("cpu").manual_seed(seed)
        return p(prompt=prompt_text, image=rgb, strength=strength, num_inference_steps=steps, generator=gen, **kw).images[0]

    reference = run(pipe, prompt)
    if isinstance(technique, Prompt):
        treated = run(pipe, technique.prompts([prompt])[0])
    elif isinstance(technique, ControlNet):
        net = technique._controlnet(backbone)
        cn_pipe = AutoPipelineForImage2Image.from_pipe(backbone.pipeline, controlnet=net)
        cn_pipe.set_progress_bar_config(disable=True)
        treated = run(cn_pipe, prompt, control_image=canny_edges(rgb, technique.low, technique.high), controlnet_conditioning_scale=technique.scale)
    elif isinstance(technique, Lora):
        with technique.active(backbone):
            treated = run(pipe, prompt)
    else:
        raise TypeError(f"no img2img test for {type(technique).__name__}")
    return Img2ImgComparison(rgb, reference, treated, float(psnr(rgb, reference)), float(psnr(rgb, treated)), _edge_iou(rgb, reference), _edge_iou(rgb, treated))
