"""GOCA ablation table on the embedded shapes model (oracle image labels, held-out test split).

    python benchmarks/goca_shapes.py --model shapes --n-val 100 --n-test 300 --out benchmarks/results/goca_shapes.json

Protocol (no tuning on the test split):
1. t is chosen on the ``val`` split among ``--t-grid``, by the mean mIoU of all five configurations.
2. tau is chosen per configuration on ``val`` (grid -0.4..1.0, step 0.05), from the same observations.
3. The five configurations are evaluated on ``--n-test`` images of the ``test`` split. Each image costs two
   forwards (heads=mean and heads=goca); layer weighting, rescaling and tau are decided from them.
Rows: vanilla (head mean, uniform layers, no rescaling), +heads, +layers, +rescaling, GOCA (all three).
Refinement (self-attention propagation) is the same in every row.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

import difffeat
from difffeat.evaluate import WIDE_TAU_GRID, ConfusionMatrix, ShapesDataset, observe_items
from difffeat.evaluate.runner import add_at_every_tau, best_tau
from difffeat.io import write_json

CONFIGS = {
    "vanilla": dict(heads="mean", layers="uniform", rescale="none"),
    "heads only": dict(heads="goca", layers="uniform", rescale="none"),
    "layers only": dict(heads="mean", layers="goca", rescale="none"),
    "rescaling only": dict(heads="mean", layers="uniform", rescale="goca"),
    "GOCA (all three)": dict(heads="goca", layers="goca", rescale="goca"),
}
TAUS = WIDE_TAU_GRID


def score(backbone, obs, config, t, tau_grid, n_classes, overrides):
    """{tau: mIoU} for one configuration over cached observations."""
    seg = difffeat.Segmenter(backbone, t=t, **config, **overrides)
    cms = {tau: ConfusionMatrix(n_classes) for tau in tau_grid}
    for item, labels, ob in obs:
        add_at_every_tau(cms, seg.decide(ob[config["heads"]]) if ob else None, labels, item.gt)
    return {tau: cm.miou() for tau, cm in cms.items()}, cms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--t-grid", default="50,100,200,300")
    p.add_argument("--template", help="caption template (default: the model's GOCA config)")
    p.add_argument("--entities", help="comma-separated background entities ('' for none; default: the model's config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a segmentation setting in every row (e.g. refine_order=1); repeatable")
    p.add_argument("--out", default="benchmarks/results/goca_shapes.json")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.template is not None:
        overrides["template"] = args.template
    if args.entities is not None:
        overrides["background_entities"] = tuple(e.strip() for e in args.entities.split(",") if e.strip())
    start = time.perf_counter()
    backbone = difffeat.load(args.model, device=args.device, dtype="fp32")
    val, test = ShapesDataset("val", args.n_val), ShapesDataset("test", args.n_test)
    n_classes = len(val.classes) + 1

    t_scores, val_obs = {}, {}
    for t in [int(x) for x in args.t_grid.split(",")]:
        val_obs[t] = observe_items(backbone, val, t, **overrides)
        per_config = {name: max(score(backbone, val_obs[t], cfg, t, TAUS, n_classes, overrides)[0].values()) for name, cfg in CONFIGS.items()}
        t_scores[t] = {"mean": float(np.mean(list(per_config.values()))), **per_config}
        print(f"val t={t}: " + ", ".join(f"{k} {v:.3f}" for k, v in t_scores[t].items()), file=sys.stderr)
    t_best = max(t_scores, key=lambda t: t_scores[t]["mean"])
    taus = {}
    for name, cfg in CONFIGS.items():
        by_tau = score(backbone, val_obs[t_best], cfg, t_best, TAUS, n_classes, overrides)[0]
        taus[name] = best_tau(by_tau)
    test_obs = observe_items(backbone, test, t_best, **overrides)
    rows = {}
    for name, cfg in CONFIGS.items():
        miou, cms = score(backbone, test_obs, cfg, t_best, (taus[name],), n_classes, overrides)
        cm = cms[taus[name]]
        iou = cm.iou()
        rows[name] = {"miou": miou[taus[name]], "tau": taus[name], **cfg, "foreground_iou": cm.foreground_iou(),
                      "class_accuracy_on_found": cm.class_accuracy_on_found(),
                      "per_class_iou": {c: float(v) for c, v in zip(["background"] + test.classes, iou)}}
    report = {
        "model": args.model, "setting": "oracle image labels", "split": "test", "n_test": args.n_test,
        "tuning": {"split": "val", "n_val": args.n_val, "t_by_mean_val_miou": t_scores, "t": t_best, "tau_per_config": taus},
        "rows": rows, "seconds": round(time.perf_counter() - start, 1),
        "settings": {k: v for k, v in difffeat.Segmenter(backbone, **overrides).settings.to_dict().items()
                     if k not in ("t", "tau", "heads", "layers", "rescale", "method")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"| configuration | mIoU (test, n={args.n_test}) | tau (val) | object-vs-background IoU | right class on found object pixels |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {100 * row['miou']:.1f} | {row['tau']:+.2f} | {100 * row['foreground_iou']:.1f} | "
              f"{100 * row['class_accuracy_on_found']:.1f} |")
    print(f"t = {t_best} (chosen on val); {report['seconds']} s")


if __name__ == "__main__":
    main()
