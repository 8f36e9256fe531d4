"""How much could any cross-attention aggregation gain on the shapes model? An oracle-map ceiling.

    python benchmarks/goca_ceiling_shapes.py --model shapes --n-val 100 --n-test 300

GOCA's three components (head weights, layer weights, per-pixel rescaling) only change how the captured
cross-attention maps are combined into class scores; blur, self-attention refinement, tau and argmax follow
unchanged. This benchmark replaces the captured maps by *perfect* ones built from the ground truth and runs
the same decision code (``Segmenter.decide``), so its mIoU bounds what any combination of maps can reach:

* ``oracle, own resolution``: every cross-attention layer's map is the ground truth at that layer's grid
  (class area fraction per cell on the class's tokens, object-free fraction on the background entity, the
  remainder on the start token) — perfect attention for this architecture;
* ``oracle, finest resolution``: every layer gets the ground truth at the finest cross-attention grid — the
  best that weighting layers could select.

Each row is decided with vanilla settings and with GOCA's (uniform/GOCA layer weights, rescaling off/on);
tau is chosen per row on ``val``, never on ``test``. The observed rows repeat goca_shapes.py's vanilla and
GOCA rows on the same images for reference. Output: ``benchmarks/results/goca_ceiling_shapes.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


import difffeat
from difffeat.evaluate import WIDE_TAU_GRID as TAUS
from difffeat.evaluate import ShapesDataset, TauSweep, labelled_items
from difffeat.io import write_json
from difffeat.segment.selfmaps import grid_of

DECISIONS = {"vanilla": dict(layers="uniform", rescale="none"), "GOCA layers + rescaling": dict(layers="goca", rescale="goca")}


def oracle_map(gt: np.ndarray, labels: list[int], layout, grid: tuple[int, int], n_tokens: int) -> torch.Tensor:
    """``[1, h*w, T]`` perfect cross-attention at ``grid``: each pixel's distribution over text positions."""
    onehot = torch.stack([torch.from_numpy(gt == lab).float() for lab in labels])  # [C, H, W]
    free = 1.0 - onehot.sum(0, keepdim=True).clamp(max=1.0)
    area = F.adaptive_avg_pool2d(torch.cat([onehot, free])[None], grid)[0].flatten(1)  # [C+1, h*w]
    out = torch.zeros(area.shape[1], n_tokens)
    for c, tokens in enumerate(layout.class_tokens):
        out[:, tokens] = area[c, :, None] / len(tokens)
    for tokens in layout.entity_tokens:  # the background entity names the object-free pixels
        out[:, tokens] = area[-1, :, None] / len(tokens)
    out[:, 0] += (1.0 - out.sum(1)).clamp(min=0.0)  # the rest on the start token, as in large models
    return out[None]


def with_oracle(obs, seg, item, labels, finest: bool):
    acts = dict(obs.activations)
    grids = {n: grid_of(acts[n].shape[1], obs.grid) for n in seg.cross_names}
    top = max(grids.values(), key=lambda g: g[0] * g[1])
    for n, g in grids.items():
        acts[n] = oracle_map(item.gt, labels, obs.layout, top if finest else g, acts[n].shape[-1]).to(acts[n])
    return replace(obs, activations=acts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--t", type=int, help="timestep (default: the model's GOCA config)")
    p.add_argument("--out", default="benchmarks/results/goca_ceiling_shapes.json")
    args = p.parse_args(argv)
    start = time.perf_counter()
    backbone = difffeat.load(args.model, device="cpu", dtype="fp32")
    extra = {"t": args.t} if args.t else {}
    observer = difffeat.Segmenter(backbone, heads="mean", **extra)
    deciders = {name: difffeat.Segmenter(backbone, heads="mean", **cfg, **extra) for name, cfg in DECISIONS.items()}
    splits = {"val": ShapesDataset("val", args.n_val), "test": ShapesDataset("test", args.n_test)}
    sources = ("observed", "oracle, own resolution", "oracle, finest resolution")
    sweep = TauSweep(len(splits["val"].classes) + 1, TAUS)
    for split, data in splits.items():
        for item, labels in labelled_items(data):
            obs = observer.observe(item.image, [data.classes[lab - 1] for lab in labels], everything=True)
            variants = {"observed": obs, sources[1]: with_oracle(obs, observer, item, labels, False),
                        sources[2]: with_oracle(obs, observer, item, labels, True)}  # fmt: skip
            for source, ob in variants.items():
                for dname, dec in deciders.items():
                    sweep.update(split, (source, dname), dec.decide(ob), labels, item.gt)
        print(f"{split}: {len(data)} images, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows = [{"maps": r["row"][0], "decision": r["row"][1], **{k: v for k, v in r.items() if k != "row"}} for r in sweep.rows()]
    report = {"model": args.model, "setting": "oracle image labels", "t": observer.settings.t, "n_val": args.n_val,
              "n_test": args.n_test, "rows": rows, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"| cross-attention maps | decision | mIoU (test, n={args.n_test}) | tau (val) | object-vs-background IoU | right class on found object pixels |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['maps']} | {r['decision']} | {100 * r['miou']:.1f} | {r['tau']:+.2f} | {100 * r['foreground_iou']:.1f} | "
              f"{100 * r['class_accuracy_on_found']:.1f} |")
    print(f"{report['seconds']} s")


if __name__ == "__main__":
    main()
