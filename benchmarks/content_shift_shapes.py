"""Content shift and its suppression by fine-grained prompts, measured on the embedded shapes model.

Usage::

    python benchmarks/content_shift_shapes.py --model shapes --out benchmarks/results/content_shift_shapes.json

Three measurements on held-out scenes of the shapes world (``test`` split; the probe trains on ``val``):

1. **Content shift exists** - features at t = 50..500 against the t = 0 reference of the same image and
   prompt: the GATE Laplacian difference ``sum_ij | ||Lap F_0|| - ||Lap F_t|| |`` (divided by
   ``sum_ij ||Lap F_0||``) and, as an independent measure, ``1 - cosine(F_0, F_t)`` per pixel. Both should
   grow with t.
2. **GATE score** of prompt techniques against a generic prompt ("a picture of shapes"), per activation:
   class-list prompts ("a photo of circle, star") and fine-grained captions naming colours, shapes and the
   background ("a red circle and a blue star on a striped green background"). Two controls separate content
   shift suppression from the prompt simply *telling* the features which classes are present:
   ``fine_no_class`` ("a red shape and a blue shape on a striped green background": no class word) and
   ``other_scene`` (the fine-grained caption of a different scene).
3. **Does the suppression pay off?** A 9-way per-pixel linear probe on the concatenated features (upsampled to
   64x64) fit on ``val`` scenes, scored on ``test`` scenes, for each prompt condition and t.

No ControlNet or LoRA is trained for the shapes model, so those techniques are not measured here (their code
paths are covered by the unit tests on tiny models).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import difffeat
from difffeat.evaluate.probe import probe_score
from difffeat.features import upsample_concat
from difffeat.io import write_json
from difffeat.shapes.captions import list_prompt
from difffeat.shapes.world import describe, sample
from difffeat.shift import Prompt, gate_scores
from difffeat.shift.gate import laplacian_diff, laplacian_norm

log = logging.getLogger("content_shift_shapes")

FEATURES = ["up_blocks.0", "up_blocks.1", "up_blocks.2"]  # up-path level outputs: 8x8, 16x16, 16x16
GENERIC_PROMPT = "a picture of shapes"


def shapeless_caption(scene) -> str:  # noqa: ANN001 - ShapeSample
    """The scene's full caption with every class word replaced by "shape": it describes the colours, the
    number of objects and the background, but does not say which shapes are present."""
    return describe([("shape", i.colour) for i in scene.instances], scene.background, scene.background_colour)


def _extract(extractor: difffeat.FeatureExtractor, images: list, prompts: list[str], t: int) -> dict[str, torch.Tensor]:
    saved = extractor.t
    extractor.t = t
    try:
        out: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(images), 50):
            for name, f in extractor(images[i : i + 50], prompts[i : i + 50]).items():
                out.setdefault(name, []).append(f)
        return {name: torch.cat(v) for name, v in out.items()}
    finally:
        extractor.t = saved


def shift_curve(extractor: difffeat.FeatureExtractor, images: list, prompts: list[str], timesteps: list[int]) -> dict:
    """Drift of the features at each t from the t = 0 features (Laplacian and cosine measures)."""
    ref = _extract(extractor, images, prompts, 0)
    curve: dict[str, dict[str, list[float]]] = {}
    for name in FEATURES:
        curve[name] = {"laplacian_rel": [], "cosine_distance": []}
    for t in timesteps:
        ft = _extract(extractor, images, prompts, t)
        for name in FEATURES:
            lap = laplacian_diff(ref[name], ft[name]) / laplacian_norm(ref[name]).flatten(1).sum(1)
            cos = 1 - F.cosine_similarity(ref[name].float(), ft[name].float(), dim=1).mean((1, 2))
            curve[name]["laplacian_rel"].append(float(lap.mean()))
            curve[name]["cosine_distance"].append(float(cos.mean()))
    return {"timesteps": timesteps, "by_feature": curve}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n-gate", type=int, default=100, help="test scenes for the shift curve and GATE scores")
    p.add_argument("--n-probe", type=int, default=200, help="scenes per probe split (val to fit, test to score)")
    p.add_argument("--curve-t", default="50,100,200,300,400,500")
    p.add_argument("--t", default="100,200,300", help="timesteps of the GATE scores and probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/content_shift_shapes.json")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()

    extractor = difffeat.FeatureExtractor(args.model, FEATURES, t=0, seed=args.seed, batch_size=50)
    conditions = {
        "generic": lambda scenes: [GENERIC_PROMPT] * len(scenes),
        "class_list": lambda scenes: [list_prompt(s.classes_present) for s in scenes],
        "fine_grained": lambda scenes: [s.caption for s in scenes],
        # controls: a fine-grained caption that names no class (colours, layout, background only), and the
        # fine-grained caption of another scene (right vocabulary, wrong content)
        "fine_no_class": lambda scenes: [shapeless_caption(s) for s in scenes],
        "other_scene": lambda scenes: [scenes[(i + 1) % len(scenes)].caption for i in range(len(scenes))],
    }
    gate_scenes = [sample("test", i) for i in range(args.n_gate)]
    gate_images = [s.image for s in gate_scenes]
    results: dict = {"model": args.model, "features": FEATURES, "generic_prompt": GENERIC_PROMPT, "n_gate": args.n_gate,
                     "n_probe": args.n_probe, "seed": args.seed}  # fmt: skip

    curve_t = [int(x) for x in args.curve_t.split(",")]
    results["shift_curve"] = shift_curve(extractor, gate_images, conditions["generic"](gate_scenes), curve_t)
    log.info("shift curve: %s", json.dumps(results["shift_curve"]))

    ts = [int(x) for x in args.t.split(",")]
    results["gate"] = {}
    for t in ts:
        extractor.t = t
        scores = {}
        for name in ("class_list", "fine_grained", "fine_no_class", "other_scene"):
            technique = Prompt(captions=conditions[name](gate_scenes), name=name)
            scores[name] = {ref: gate_scores(extractor, gate_images, GENERIC_PROMPT, [technique], reference=ref)
                            for ref in ("plain", "treated")}  # fmt: skip
        results["gate"][str(t)] = scores
        log.info("GATE t=%d: %s", t, scores)

    fit = [sample("val", i) for i in range(args.n_probe)]
    test = [sample("test", i) for i in range(args.n_probe)]
    y_fit = torch.from_numpy(np.stack([s.mask for s in fit])).long()
    y_test = torch.from_numpy(np.stack([s.mask for s in test])).long()
    results["probe"] = {}
    for t in ts:
        row = {}
        for name, make in conditions.items():
            f_fit = upsample_concat(_extract(extractor, [s.image for s in fit], make(fit), t), size=(64, 64))
            f_test = upsample_concat(_extract(extractor, [s.image for s in test], make(test), t), size=(64, 64))
            row[name] = probe_score(f_fit, y_fit, f_test, y_test, num_classes=9, seed=args.seed).to_json()
        results["probe"][str(t)] = row
        log.info("probe t=%d: %s", t, row)
    results["elapsed_s"] = round(time.time() - t0, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(json.dumps({k: results[k] for k in ("gate", "probe")}, indent=2))


if __name__ == "__main__":
    main()
