"""Do GOCA's head weights pick the heads whose maps find the objects? A per-head diagnosis on the shapes model.

    python benchmarks/goca_heads_shapes.py --model shapes --n 100

GOCA weights head n of a cross-attention layer at pixel i by its share of the layer's output,
``w_n(i) = <o_n(i), o(i)> / ||o(i)||^2`` (method.md section 3). That helps when the heads that write most
into the output are the heads whose maps put the class tokens on the class's pixels. This benchmark measures
both per head, on ``val`` scenes of the shapes world (oracle image labels, the model's GOCA t and caption):

* **map IoU**: head n's class map (mean over the class's tokens), bilinearly upsampled to 64x64, min-max
  normalised, thresholded at 0.5, IoU against the class mask; averaged over (image, class) pairs;
* **weight on the object**: head n's GOCA weight averaged over the class's pixels (at the layer's grid).

Per layer it also gives the IoU of the head-mean map (vanilla) and of the GOCA head-weighted map, and over all
heads of all layers the Pearson correlation between a head's IoU and its weight. The head contributions
``o_n`` are computed here from the captured per-head probabilities and the layer's own ``to_v`` and ``to_out``,
independently of the observer that computes them inside the attention. Output:
``benchmarks/results/goca_heads_shapes.json``.

With ``--n-test N`` it also asks how much head weighting *could* gain if it picked the good heads: the same
segmentation (decision code unchanged, tau chosen on ``val``) is run on N ``test`` images with four head
reductions: the head mean (vanilla), GOCA's per-pixel weights, and two fixed weightings chosen from the
``val`` head IoUs above: weights proportional to each head's IoU, and the best head of each layer alone.
The last two use ground-truth masks, so they are not training-free; they bound, they do not compete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


import difffeat
from difffeat.evaluate import WIDE_TAU_GRID as TAUS
from difffeat.evaluate import ShapesDataset, TauSweep, labelled_items
from difffeat.io import write_json
from difffeat.segment.aggregation import FixedHeadWeights, GocaHeadReducer, goca_head_weights
from difffeat.segment.selfmaps import grid_of

DECISIONS = {"vanilla decision": dict(layers="uniform", rescale="none"), "GOCA layers + rescaling": dict(layers="goca", rescale="goca")}


def head_contributions(attn: torch.nn.Module, probs_hqt: torch.Tensor, text_bd: torch.Tensor) -> torch.Tensor:
    """``o_n(i) = (A_n V_n W_O^n)(i)`` for every head of a cross-attention module: ``[heads, q, C]``.

    Args:
        attn: the diffusers ``Attention`` module (its ``to_v`` and ``to_out[0]``).
        probs_hqt: the layer's per-head probabilities ``[heads, q, T]``.
        text_bd: the text states the layer attends to, ``[T, D]``.
    """
    heads, _, n_text = probs_hqt.shape
    v_htd = attn.to_v(text_bd).float().view(n_text, heads, -1).transpose(0, 1)
    w_out = attn.to_out[0].weight.float().view(-1, heads, v_htd.shape[-1])  # [C, heads, d]
    return torch.einsum("hqd,chd->hqc", probs_hqt.float() @ v_htd, w_out)


def map_iou(map_gg: torch.Tensor, mask: np.ndarray) -> float:
    """IoU of a class map (upsampled to the mask's size, min-max normalised, > 0.5) with a boolean mask."""
    up = F.interpolate(map_gg[None, None].float(), size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-8)
    pred, gt = up.numpy() > 0.5, mask
    return float((pred & gt).sum() / max((pred | gt).sum(), 1))


def per_head_maps(seg: difffeat.Segmenter, image, classes: list[str]):
    """``(layout, inputs, {cross name: [heads, HW, T]}, text states [T, D])`` of one segmentation forward."""
    layout, inputs = seg.prepare(image, classes)
    with torch.no_grad(), difffeat.Capture(seg.backbone, list(seg.cross_names), inputs) as cap:
        seg.backbone.denoise(inputs)
    return layout, inputs, {n: a[0] for n, a in cap.activations.items()}, inputs.kwargs["encoder_hidden_states"][0]


def head_weighting_gain(seg: difffeat.Segmenter, layers: dict, n_val: int, n_test: int) -> list[dict]:
    """mIoU on ``test`` of four head reductions x two decisions, tau chosen per row on ``val``."""
    names = list(seg.cross_names)
    goca = GocaHeadReducer()  # the shapes model's cross-attention modules all have to_out
    schemes = {
        "head mean (vanilla)": {},
        "GOCA head weights": dict.fromkeys(names, goca),
        "fixed, proportional to val head IoU (supervised)": {
            n: FixedHeadWeights((np.array(layers[n]["head_iou"]) / np.sum(layers[n]["head_iou"])).tolist()) for n in names},
        "fixed, best val head per layer (supervised)": {
            n: FixedHeadWeights(np.eye(len(layers[n]["head_iou"]))[int(np.argmax(layers[n]["head_iou"]))].tolist()) for n in names},
    }  # fmt: skip
    observer = difffeat.Segmenter(seg.backbone, heads="mean")  # heads the schemes do not name: head mean
    deciders = {d: difffeat.Segmenter(seg.backbone, heads="mean", **cfg) for d, cfg in DECISIONS.items()}
    splits = {"val": ShapesDataset("val", n_val), "test": ShapesDataset("test", n_test)}
    sweep = TauSweep(len(splits["val"].classes) + 1, TAUS)
    for split, data in splits.items():
        for item, labels in labelled_items(data):
            classes = [data.classes[lab - 1] for lab in labels]
            for scheme, reducers in schemes.items():
                obs = observer.observe(item.image, classes, everything=True, head_reducers=reducers)
                for dname, dec in deciders.items():
                    sweep.update(split, (scheme, dname), dec.decide(obs), labels, item.gt)
    rows = [{"heads": r["row"][0], "decision": r["row"][1], **{k: round(v, 4) for k, v in r.items() if k not in ("row", "tau")}, "tau": r["tau"]}
            for r in sweep.rows()]  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n", type=int, default=100, help="val scenes")
    p.add_argument("--n-test", type=int, default=0, help="test images for the head-weighting segmentation rows (0: skip)")
    p.add_argument("--out", default="benchmarks/results/goca_heads_shapes.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    backbone = difffeat.load(args.model, device="cpu", dtype="fp32")
    seg = difffeat.Segmenter(backbone)
    data = ShapesDataset("val", args.n)
    per = {n: {"head_iou": [], "head_weight": [], "mean_iou": [], "goca_iou": []} for n in seg.cross_names}
    for item, labels in labelled_items(data):
        layout, inputs, heads, text = per_head_maps(seg, item.image, [data.classes[lab - 1] for lab in labels])
        for name, probs in heads.items():  # [heads, HW, T]
            attn = backbone.denoiser.get_submodule(name.rsplit(".", 1)[0])
            weights = goca_head_weights(head_contributions(attn, probs, text)[None])[0]  # [heads, HW]
            goca_map = torch.einsum("hq,hqt->qt", weights, probs.float())
            gh, gw = grid_of(probs.shape[1], tuple(inputs.grid))
            for lab, tokens in zip(labels, layout.class_tokens):
                mask = item.gt == lab
                small = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(gh, gw), mode="area")[0, 0].flatten() > 0.5
                if not small.any():
                    continue
                rec = per[name]
                rec["head_iou"].append([map_iou(probs[h][:, tokens].mean(-1).view(gh, gw), mask) for h in range(probs.shape[0])])
                rec["head_weight"].append(weights[:, small].mean(1).tolist())
                rec["mean_iou"].append(map_iou(probs.float().mean(0)[:, tokens].mean(-1).view(gh, gw), mask))
                rec["goca_iou"].append(map_iou(goca_map[:, tokens].mean(-1).view(gh, gw), mask))
    layers = {}
    for name, rec in per.items():
        layers[name] = {"head_iou": np.mean(rec["head_iou"], 0).round(4).tolist(),
                        "head_weight_on_object": np.mean(rec["head_weight"], 0).round(4).tolist(),
                        "head_mean_map_iou": round(float(np.mean(rec["mean_iou"])), 4),
                        "goca_map_iou": round(float(np.mean(rec["goca_iou"])), 4), "pairs": len(rec["mean_iou"])}  # fmt: skip
    ious = np.concatenate([v["head_iou"] for v in layers.values()])
    wts = np.concatenate([v["head_weight_on_object"] for v in layers.values()])
    report = {"model": args.model, "split": "val", "n": args.n, "t": seg.settings.t, "layers": layers,
              "pearson_head_iou_vs_weight": round(float(np.corrcoef(ious, wts)[0, 1]), 4)}  # fmt: skip
    if args.n_test:
        report["segmentation"] = {"n_val": args.n, "n_test": args.n_test, "setting": "oracle image labels",
                                  "rows": head_weighting_gain(seg, layers, args.n, args.n_test)}  # fmt: skip
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print("| layer | map IoU per head | GOCA weight on the object per head | head-mean map IoU | GOCA map IoU |")
    print("|---|---|---|---|---|")
    for name, v in layers.items():
        short = name.split(".transformer_blocks")[0]
        print(f"| {short} | {' / '.join(f'{x:.2f}' for x in v['head_iou'])} | {' / '.join(f'{x:.2f}' for x in v['head_weight_on_object'])} "
              f"| {v['head_mean_map_iou']:.3f} | {v['goca_map_iou']:.3f} |")  # fmt: skip
    print(f"Pearson(head IoU, head weight) over all heads: {report['pearson_head_iou_vs_weight']:+.2f}")
    if args.n_test:
        print(f"\n| heads | decision | mIoU (test, n={args.n_test}) | tau (val) | object-vs-background IoU | right class on found object pixels |")
        print("|---|---|---|---|---|---|")
        for r in report["segmentation"]["rows"]:
            print(f"| {r['heads']} | {r['decision']} | {100 * r['miou']:.1f} | {r['tau']:+.2f} | {100 * r['foreground_iou']:.1f} "
                  f"| {100 * r['class_accuracy_on_found']:.1f} |")  # fmt: skip
    print(f"{report['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
