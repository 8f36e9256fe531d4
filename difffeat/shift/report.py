"""``difffeat gate`` as one library call: GATE Laplacian scores per technique and activation, and the img2img
comparisons, written to a folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_device, check_number, check_out_dir, split_names
from ..errors import InvalidOptionError


def default_gate_features(catalog) -> list[str]:
    """The activation GATE scores when none is named: the first cross-attention query (``cross-q``, or
    ``joint-q`` on MMDiTs) among the catalog's feature candidates (any, if no candidate is one)."""
    kinds = ("cross-q", "joint-q")
    queries = [a.name for a in catalog.candidates() if a.kind in kinds] or [a.name for a in catalog if a.kind in kinds]
    if not queries:
        raise InvalidOptionError("this model has no cross-attention query to score; name activations with --features")
    return queries[:1]


@dataclass
class GateReport:
    """Scores per technique spec (``{feature: score}``), the feature names, and the JSON written."""

    t: int
    features: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    json_path: Path | None = None


def run_gate(model: str, images: Sequence[str | os.PathLike], techniques: Sequence[str], *, features=None,
             prompt: str = "", t: int = 50, out_dir: str | os.PathLike = "gate_out", img2img: bool = True,
             strength: float = 0.75, steps: int = 20, device: str | None = None, dtype: str | None = None,
             model_config: str | os.PathLike | None = None) -> GateReport:
    """Score each technique (``prompt:...``, ``controlnet:...``, ``lora:...``) on ``images``; with ``img2img``
    also write ``out_dir/<stem>_<technique>.png`` comparisons; ``out_dir/gate.json`` holds everything.
    ``model_config``: the architecture of a single-file ``model`` (``config=`` of :func:`difffeat.load`)."""
    from ..backbones import load
    from ..capture import catalog_of
    from ..features import FeatureExtractor
    from ..io import write_bytes, write_json
    from .gate import gate_img2img, gate_scores
    from .techniques import parse_technique

    check_number("--t", t, 0, 999, integer=True)
    check_number("--strength", strength, 0.0, 1.0)
    check_number("--steps", steps, 1, 1000, integer=True)
    if not techniques:
        raise InvalidOptionError("name at least one --technique")
    techs = [parse_technique(spec) for spec in techniques]
    out = check_out_dir(out_dir, "--out folder")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise InvalidOptionError(f"image file not found: {missing[0]!r}")
    check_device(device)
    backbone = load(model, device=device, dtype=dtype, config=model_config)
    names = split_names(features) or default_gate_features(catalog_of(backbone))
    fx = FeatureExtractor(backbone, names, t=t)
    report = GateReport(t, names)
    for spec, tech in zip(techniques, techs):
        entry = {"technique": spec, "scores": gate_scores(fx, list(images), prompt, [tech]), "img2img": []}
        if img2img:
            for path in images:
                cmp = gate_img2img(backbone, path, prompt, tech, strength=strength, steps=steps)
                target = out / f"{Path(path).stem}_{tech.name}.png"
                write_bytes(target, lambda tmp, img=cmp.side_by_side(): img.save(tmp, format="PNG"))
                entry["img2img"].append({"image": str(path), "file": str(target), **cmp.to_json()})
        report.rows.append(entry)
    report.json_path = write_json(out / "gate.json", report.rows)
    return report
