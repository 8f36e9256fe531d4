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
from difffeat.evaluate import WIDE_TAU_GRID as TAUS
from difffeat.evaluate import ConfusionMatrix, ShapesDataset, observe_items
from difffeat.evaluate.runner import to_dataset_labels
from difffeat.io import write_json


def best_miou(seg: difffeat.Segmenter, obs: list, n_classes: int) -> tuple[float, float, list[float]]:
    """(best mIoU over TAUS, that tau, mean layer weights) of ``seg`` deciding cached observations."""
    cms = {tau: ConfusionMatrix(n_classes) for tau in TAUS}
    weights = []
    for item, labels, by_heads in obs:
        if by_heads is None:  # no object in the scene: nothing prompted, nothing to decide
            continue
        result = seg.decide(by_heads[seg.settings.heads])
        weights.append(result.layer_weights)
        for tau, cm in cms.items():
            cm.update(item.gt, to_dataset_labels(result.with_tau(tau), labels, item.gt.shape))
    tau = max(TAUS, key=lambda x: cms[x].miou())
    return cms[tau].miou(), tau, np.mean(weights, 0).tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n", type=int, default=60, help="val scenes")
    p.add_argument("--t", type=int, help="timestep (default: the model's GOCA config)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/goca_layers_shapes.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = difffeat.load(args.model)
    data = ShapesDataset("val", args.n)
    n_classes = len(data.classes) + 1
    default = difffeat.Segmenter(backbone)
    t = args.t or default.settings.t
    obs = observe_items(backbone, data, t)
    report = {"model": args.model, "split": "val", "n": args.n, "t": t, "layers": {}, "settings": {}}
    heads = ("mean", "goca")
    for block in default.blocks:
        row = {}
        for h in heads:
            seg = difffeat.Segmenter(backbone, method="vanilla", heads=h, t=t, map_layers=[block])
            row[f"miou_heads_{h}"], row[f"tau_heads_{h}"], _ = best_miou(seg, obs, n_classes)
        report["layers"][block] = row
        print(f"{block:48s} alone: head mean {row['miou_heads_mean']:.3f}, GOCA heads {row['miou_heads_goca']:.3f}", flush=True)
    for layers in ("uniform", "goca"):
        for rescale in ("none", "goca"):
            for h in heads:
                seg = difffeat.Segmenter(backbone, heads=h, layers=layers, rescale=rescale, t=t)
                miou, tau, w = best_miou(seg, obs, n_classes)
                key = f"heads={h} layers={layers} rescale={rescale}"
                report["settings"][key] = {"miou": miou, "tau": tau, "mean_layer_weights": dict(zip(seg.blocks, w))}
                print(f"{key:45s} {miou:.3f} (tau {tau:+.2f}); layer weights {np.round(w, 3).tolist()}", flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
