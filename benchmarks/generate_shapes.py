"""Segment what you generate, on the embedded shapes model (a text-to-image model of the shapes world).

1. Prompts: the captions of the first ``--n`` test-split scenes that hold 2-3 objects of distinct shapes
   (the world's own caption style: "a red circle and a blue star on a striped green background").
2. A pixel probe trained on the shapes world's ground truth: difffeat's per-pixel linear probe
   (:class:`difffeat.evaluate.PixelProbe`, background + 8 shapes) on the model's features (the greedy
   selection of ``benchmarks/features_shapes.py``, upsampled to 64x64) plus the RGB pixels, fitted on
   ``--n-probe`` val-split scenes; its own mIoU on the real test scenes is reported for scale.
3. Every prompt is generated (seed = prompt index) under ``difffeat.trace`` with ``--guidance`` cfg,
   scfg-goca and scfg. Reported per guidance: mIoU of GOCA's traced label maps against the probe's labels of
   the same generated images (classes present in either), and the fraction of images in which the probe finds
   every prompted shape (>= 20 px, the world's minimum visible area).

    python benchmarks/generate_shapes.py                     # 100 prompts x 3 guidances, 20 steps
    python benchmarks/generate_shapes.py --steps 10 --guidances cfg,scfg-goca --n-probe 100   # the README's run
    python benchmarks/generate_shapes.py --n 10 --steps 10   # quick look

Smaller runs on a shared machine: one guidance per run (``--guidances cfg`` then ``--guidances scfg-goca``) and
part of the prompts per run (``--prompts 0-49`` then ``--prompts 50-99``), with the same other options, merge into
one report and figure: when the report's settings and probe match, a run adds its prompts' counts (confusion
matrix, images with every shape found) to its guidance's entry, or replaces the entry when the prompts overlap;
other guidances stay. The figure's band of a guidance comes from the run that generated its prompt 0.

    python benchmarks/generate_shapes.py --steps 10 --guidances scfg-goca --n-probe 100 --prompts 0-49

Label maps average the traced maps over the last ``--trace-last`` fraction of the steps (default: half):
the shapes model's GOCA settings were chosen at t = 50, and the early, noisy steps blur the maps.

Output: ``benchmarks/results/generate_shapes.json`` and ``benchmarks/results/generate_shapes.png`` (examples:
image, probe, GOCA per guidance).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import difffeat
from difffeat.evaluate import PixelProbe
from difffeat.evaluate.metrics import ConfusionMatrix
from difffeat.io import write_json
from difffeat.segment.outputs import colorize
from difffeat.shapes import world
from difffeat.tracing import SCFG

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_FEATURES = ["up_blocks.2.attentions.0", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.q",
                  "up_blocks.2.attentions.1.transformer_blocks.0.attn1.out"]  # features_shapes.json's greedy pick
SIZE = world.IMAGE_SIZE
N_CLASSES = len(world.SHAPE_CLASSES) + 1


def prompts(n: int) -> list[tuple[str, list[str]]]:
    """(caption, shapes named) of the first n test scenes with 2-3 objects of distinct shapes."""
    out, i = [], 0
    while len(out) < n:
        s = world.sample("test", i)
        names = [inst.class_name for inst in s.instances]
        if 2 <= len(names) <= 3 and len(set(names)) == len(names):
            out.append((s.caption, names))
        i += 1
    return out


def probe_input(fx: difffeat.FeatureExtractor, images: list[Image.Image]) -> torch.Tensor:
    """``[n, C + 3, 64, 64]``: the probe features upsampled to the image grid, then the RGB pixels."""
    parts = []
    for i in range(0, len(images), 32):
        feats = fx(images[i : i + 32])
        ups = [F.interpolate(feats[n].float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False) for n in PROBE_FEATURES]
        rgb = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((SIZE, SIZE))) for im in images[i : i + 32]]))
        parts.append(torch.cat([*ups, rgb.permute(0, 3, 1, 2).float() / 255], dim=1))
    return torch.cat(parts)


def fit_probe(fx, n_train: int, n_test: int) -> tuple[PixelProbe, dict[str, float]]:
    train = [world.sample("val", i) for i in range(n_train)]
    x = probe_input(fx, [s.image for s in train])
    y = torch.from_numpy(np.stack([s.mask.astype(np.int64) for s in train]))
    probe = PixelProbe(N_CLASSES, pixels_per_image=1024).fit(x, y)
    test = [world.sample("test", i) for i in range(n_test)]
    score = probe.score(probe_input(fx, [s.image for s in test]), torch.from_numpy(np.stack([s.mask.astype(np.int64) for s in test])))
    return probe, {"test_scenes": n_test, **{k: round(100 * v, 2) for k, v in score.to_json().items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--n-probe", type=int, default=200)
    ap.add_argument("--guidances", default="cfg,scfg-goca,scfg")
    ap.add_argument("--prompts", default=None, help="the prompt indices of this run, A-B (inclusive; default all --n)")
    ap.add_argument("--trace-last", type=float, default=0.5, help="fraction of the steps (the last ones) whose maps make the label maps")
    ap.add_argument("--aggregate", choices=["steps", "maps"], default="steps",
                    help="trace()'s aggregate: 'steps' (GOCA's decision at every traced step, averaged; the setting the "
                         "README's figures were measured with) or 'maps' (the library default since: step-mean cross maps)")
    ap.add_argument("--out", type=Path, default=RESULTS / "generate_shapes.json")
    ap.add_argument("--figure", type=Path, default=RESULTS / "generate_shapes.png")
    args = ap.parse_args(argv)
    start = time.time()
    torch.manual_seed(0)
    backbone = difffeat.load("shapes", device="cpu", dtype="fp32")
    pipe = backbone.pipeline
    fx = difffeat.FeatureExtractor(backbone, PROBE_FEATURES, t=50, batch_size=32)
    probe, probe_score = fit_probe(fx, args.n_probe, args.n)
    items = prompts(args.n)
    lo, hi = (int(x) for x in args.prompts.split("-")) if args.prompts else (0, args.n - 1)
    if not 0 <= lo <= hi < args.n:
        raise SystemExit(f"--prompts {args.prompts}: a range A-B within 0-{args.n - 1}")
    traced = list(range(int(round(args.steps * (1 - args.trace_last))), args.steps))
    report = {"model": "shapes", "n": args.n, "steps": args.steps, "traced_steps": traced, "guidance_scale": args.guidance_scale, "aggregate": args.aggregate,
              "probe": {"features": PROBE_FEATURES + ["rgb"], "train_scenes": args.n_probe, **probe_score}, "guidance": {}}
    report = _merge_into(args.out, report)
    examples: dict[str, list[tuple[Image.Image, np.ndarray, np.ndarray]]] = {}
    for mode in args.guidances.split(","):
        mode_start = time.time()
        cm = ConfusionMatrix(N_CLASSES)
        found: list[int] = []  # per prompt: 1 if the probe finds every prompted shape
        shown = []
        for i, (caption, names) in list(enumerate(items))[lo : hi + 1]:
            with difffeat.trace(pipe, caption, names, steps=traced, guidance=SCFG(args.guidance_scale, mode),
                                aggregate=args.aggregate) as tc:
                image = pipe(caption, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=SIZE,
                             width=SIZE, generator=torch.Generator().manual_seed(i)).images[0]
            result = tc.result(0, image)
            lut = np.array([0] + [world.CLASS_TO_INDEX[c] for c in result.classes], dtype=np.uint8)
            goca = lut[result.labels]  # world class indices
            probed = probe.predict(probe_input(fx, [image]))[0].numpy().astype(np.uint8)
            cm.update(probed, goca)
            found.append(int(all(int((probed == world.CLASS_TO_INDEX[c]).sum()) >= world.MIN_VISIBLE_PX for c in names)))
            if len(shown) < 6:
                shown.append((image, probed, goca))
        part = {"prompts": [[lo, hi]], "images": hi - lo + 1, "found": sum(found), "found_per_prompt": {str(lo): found},
                "confusion": cm.counts.tolist(),
                "seconds": round(time.time() - mode_start, 1)}
        report["guidance"][mode] = _add_part(report["guidance"].get(mode), part)
        if lo == 0:
            examples[mode] = shown
        print(mode, {k: v for k, v in report["guidance"][mode].items() if k != "confusion"}, flush=True)
        write_json(args.out, report)  # after each guidance: a cut-off run keeps what it measured
    report.setdefault("runs", []).append({"guidances": args.guidances.split(","), "prompts": [lo, hi],
                                          "seconds": round(time.time() - start, 1)})
    if examples:
        report["figure_rows"] = _figure(examples, args.figure, order=list(report["guidance"]), previous=report.get("figure_rows"))
    write_json(args.out, report)
    return report


_SETTINGS = ("model", "n", "steps", "traced_steps", "guidance_scale", "aggregate")


def _add_part(entry: dict | None, part: dict) -> dict:
    """A guidance's entry with this run's prompts added (counts summed), or this run's alone when the entry has
    no counts or already holds some of these prompts; the figures recomputed from the counts."""
    ranges = (entry or {}).get("prompts", [])
    if entry is None or "confusion" not in entry or any(a <= part["prompts"][0][1] and part["prompts"][0][0] <= b for a, b in ranges):
        total = dict(part)
    else:
        total = {"prompts": sorted(ranges + part["prompts"]), "images": entry["images"] + part["images"],
                 "found": entry["found"] + part["found"],
                 "found_per_prompt": {**entry.get("found_per_prompt", {}), **part["found_per_prompt"]},
                 "confusion": (np.array(entry["confusion"]) + np.array(part["confusion"])).tolist(),
                 "seconds": round(entry["seconds"] + part["seconds"], 1)}
    cm = ConfusionMatrix(N_CLASSES)
    cm.counts = np.array(total["confusion"], dtype=np.int64)
    return {"goca_vs_probe_miou": round(100 * float(cm.miou()), 2),
            "probe_finds_every_prompted_shape": round(total["found"] / total["images"], 3), **total}


def _merge_into(path: Path, report: dict) -> dict:
    """The existing report at ``path`` with this run's settings, or ``report`` when none matches.

    Same settings and the same probe (its training scenes and its test score): this run's guidances replace
    their entries and the others stay, so one guidance per run builds the full report.
    """
    if not path.exists():
        return report
    import json

    old = json.loads(path.read_text())
    if any(old.get(k) != report[k] for k in _SETTINGS) or old.get("probe") != report["probe"] or "runs" not in old:
        print(f"{path}: other settings or probe; starting a new report", flush=True)
        return report
    return {**old, "guidance": dict(old["guidance"])}


def _figure(examples: dict[str, list], path: Path, order: list[str], previous: list[str] | None, scale: int = 2) -> list[str]:
    """Rows: one band per guidance (image, probe, GOCA rows); columns: the first examples.

    Bands of guidances this run did not measure are kept from the figure at ``path`` (``previous`` names its
    bands in order). Returns the guidances of the written figure's bands, in order.
    """
    band_h = 3 * SIZE * scale
    bands: dict[str, np.ndarray] = {}
    if previous and path.exists():
        old = np.asarray(Image.open(path).convert("RGB"))
        bands = {m: old[i * band_h : (i + 1) * band_h] for i, m in enumerate(previous) if (i + 1) * band_h <= old.shape[0]}
    for mode, shown in examples.items():
        rows = []
        for k in range(3):
            tiles = [(im.convert("RGB") if k == 0 else colorize(lab if k == 1 else goca).convert("RGB"))
                     for im, lab, goca in shown]
            rows.append(np.concatenate([np.asarray(t.resize((SIZE * scale, SIZE * scale), Image.NEAREST)) for t in tiles], axis=1))
        bands[mode] = np.concatenate(rows, axis=0)
    kept = [m for m in order if m in bands and bands[m].shape[1] == bands[next(iter(examples))].shape[1]]
    Image.fromarray(np.concatenate([bands[m] for m in kept], axis=0)).save(path)
    return kept


if __name__ == "__main__":
    main()
