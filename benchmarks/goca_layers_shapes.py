"""Diagnostic: how good is each cross-attention layer alone, and what weight does GOCA give it?

    python benchmarks/goca_layers_shapes.py --model shapes --n 60

On ``--n`` scenes of the shapes world's ``val`` split (oracle image labels), for every cross-attention layer:
the mIoU of the vanilla pipeline restricted to that layer (``map_layers=[layer]``), with head mean and with
GOCA head weights; then the five ablation settings over all layers with GOCA's mean layer weights. Each
figure takes its best tau on the same images (grid -0.4..1.0), so these are upper bounds that compare
layers, not test-set results (those come from ``goca_shapes.py``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import difffeat
from difffeat.evaluate import ConfusionMatrix, ShapesDataset
from difffeat.evaluate.runner import _to_dataset_labels
from difffeat.io import write_json

TAUS = tuple(float(x) for x in np.round(np.linspace(-0.4, 1.0, 29), 3))


def best_miou(seg: difffeat.Segmenter, observations: list, n_classes: int) -> tuple[float, float, list[float]]:
    """(best mIoU over TAUS, that tau, mean layer weights) of ``seg`` deciding cached observations."""
    cms = {tau: ConfusionMatrix(n_classes) for tau in TAUS}
    weights = []
    for item, labels, obs in observations:
        result = seg.decide(obs)
        weights.append(result.layer_weights)
        for tau, cm in cms.items():
            cm.update(item.gt, _to_dataset_labels(result.with_tau(tau), labels, item.gt.shape))
    tau = max(TAUS, key=lambda x: cms[x].miou())
    return cms[tau].miou(), tau, np.mean(weights, 0).tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n", type=int, default=60, help="val scenes")
    p.add_argument("--t", type=int, help="timestep (default: the model's GOCA config)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="goca_layers.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = difffeat.load(args.model)
    data = ShapesDataset("val", args.n)
    n_classes = len(data.classes) + 1
    extra = {"t": args.t} if args.t else {}
    observers = {h: difffeat.Segmenter(backbone, method="vanilla", heads=h, **extra) for h in ("mean", "goca")}
    obs = {h: [] for h in observers}
    for i in range(len(data)):
        item = data[i]
        labels = item.present()
        if not labels:
            continue
        names = [data.classes[label - 1] for label in labels]
        for h, seg in observers.items():
            obs[h].append((item, labels, seg.observe(item.image, names, everything=True)))
    report = {"model": args.model, "split": "val", "n": args.n, "t": observers["mean"].settings.t, "layers": {}, "settings": {}}
    for block in observers["mean"].blocks:
        row = {}
        for h in observers:
            seg = difffeat.Segmenter(backbone, method="vanilla", heads=h, map_layers=[block], **extra)
            row[f"miou_heads_{h}"], row[f"tau_heads_{h}"], _ = best_miou(seg, obs[h], n_classes)
        report["layers"][block] = row
        print(f"{block:48s} alone: head mean {row['miou_heads_mean']:.3f}, GOCA heads {row['miou_heads_goca']:.3f}", flush=True)
    for layers in ("uniform", "goca"):
        for rescale in ("none", "goca"):
            for h in observers:
                seg = difffeat.Segmenter(backbone, heads=h, layers=layers, rescale=rescale, **extra)
                miou, tau, w = best_miou(seg, obs[h], n_classes)
                key = f"heads={h} layers={layers} rescale={rescale}"
                report["settings"][key] = {"miou": miou, "tau": tau, "mean_layer_weights": dict(zip(seg.blocks, w))}
                print(f"{key:45s} {miou:.3f} (tau {tau:+.2f}); layer weights {np.round(w, 3).tolist()}", flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
