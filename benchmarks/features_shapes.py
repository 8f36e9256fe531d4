"""Which activations of the embedded shapes model are discriminative features? A linear-probe benchmark.

The generic-diffusion-feature paper's claim, measured on the model difffeat ships: activations differ a lot
as features, and the conventional picks (block and upsampler outputs) are not the best ones. For every
capturable activation except attention maps, at one timestep:

1. features of ``--n-train`` val-split scenes, bilinearly upsampled to 64x64, train difffeat's per-pixel
   linear probe (:class:`difffeat.evaluate.PixelProbe`: softmax regression on standardised features,
   L-BFGS; background + 8 shapes);
2. ``--n-select`` further val scenes score it (mIoU) -- used to rank activations and to pick a selection;
3. ``--n-test`` test-split scenes give the reported mIoU.

Selections: the best single activation, a greedy forward selection of up to ``--max-picks`` activations
(each step adds the activation that most improves the val score of the concatenated probe; stops when none
adds ``--min-gain``), and the conventional "block outputs" baseline (the upsampler outputs plus the last ViT
output, like the sd15-legacy preset). The diffusion model never saw val or test scenes (it was trained on
the train split). Output: ``benchmarks/results/features_shapes.json`` and a Markdown table.

    python benchmarks/features_shapes.py                       # ~4 min on 2 CPU cores
    python benchmarks/features_shapes.py --n-train 40 --n-select 20 --n-test 20   # quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import difffeat
from difffeat.evaluate import probe_score
from difffeat.io import write_json
from difffeat.shapes import world

SIZE = 64  # the shapes world's image size: features are upsampled to it, masks are used as they are


def scenes(split: str, start: int, n: int) -> tuple[list, np.ndarray]:
    """Images and ``[n, 64, 64]`` uint8 masks (0 background, i = SHAPE_CLASSES[i-1]) of a split's scenes."""
    samples = [world.sample(split, start + i) for i in range(n)]
    return [s.image for s in samples], np.stack([s.mask.astype(np.uint8) for s in samples])


def extract(fx: difffeat.FeatureExtractor, images: list, batch: int = 32) -> dict[str, torch.Tensor]:
    """``{name: [n, C, h, w]}`` float16 (half the memory; standardised in float32 later)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch):
        for name, t in fx(images[i : i + batch]).items():
            parts.setdefault(name, []).append(t.to(torch.float16))
    return {k: torch.cat(v) for k, v in parts.items()}


def dense(feats: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """``[n, sum C, 64, 64]``: the named features upsampled to the masks' size and concatenated."""
    return difffeat.upsample_concat({n: feats[n].float() for n in names}, size=(SIZE, SIZE))


def probe_miou(train: dict[str, torch.Tensor], train_y: np.ndarray, test: dict[str, torch.Tensor], test_y: np.ndarray,
               names: list[str], n_classes: int) -> float:  # fmt: skip
    """mIoU (%) on ``test`` of difffeat's linear probe on ``names``, fitted on ``train``."""
    score = probe_score(dense(train, names), torch.from_numpy(train_y), dense(test, names), torch.from_numpy(test_y), n_classes)
    return 100.0 * score.miou


def greedy_selection(score, candidates: list[str], max_picks: int, min_gain: float) -> list[tuple[list[str], float]]:
    """Forward selection: ``[(selection, val score)]`` after each added activation."""
    picked: list[str] = []
    best = -1.0
    path = []
    for _ in range(max_picks):
        trial = {n: score(picked + [n]) for n in candidates if n not in picked}
        name, value = max(trial.items(), key=lambda kv: kv[1])
        if picked and value < best + min_gain:
            break
        picked, best = picked + [name], value
        path.append((list(picked), round(value, 2)))
    return path


def conventional(catalog) -> list[str]:
    """The "block outputs" baseline: every upsampler output plus the last ViT output of the up path."""
    ups = [a.name for a in catalog if a.kind == "upsampler-out"]
    vits = [a.name for a in catalog if a.kind == "vit-out" and a.name.startswith("up_blocks.")]
    return ups + vits[-1:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--t", type=int, default=50)
    p.add_argument("--n-train", type=int, default=200, help="val scenes that train each probe")
    p.add_argument("--n-select", type=int, default=100, help="further val scenes that rank activations")
    p.add_argument("--n-test", type=int, default=200, help="test scenes for the reported numbers")
    p.add_argument("--max-picks", type=int, default=4)
    p.add_argument("--min-gain", type=float, default=0.5, help="mIoU points a greedy step must add")
    p.add_argument("--out", default="benchmarks/results/features_shapes.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()

    backbone = difffeat.load(args.model, device="cpu", dtype="fp32")
    catalog = difffeat.list_activations(backbone)
    names = [a.name for a in catalog if not a.kind.endswith("-map")]
    fx = difffeat.FeatureExtractor(backbone, names, t=args.t, batch_size=32)
    n_classes = len(world.SHAPE_CLASSES) + 1
    (tr_img, tr_y), (se_img, se_y), (te_img, te_y) = (
        scenes("val", 0, args.n_train), scenes("val", args.n_train, args.n_select), scenes("test", 0, args.n_test))
    tr, se, te = extract(fx, tr_img), extract(fx, se_img), extract(fx, te_img)
    info = {a.name: a for a in catalog}

    def val_score(selection: list[str]) -> float:
        return probe_miou(tr, tr_y, se, se_y, selection, n_classes)

    def test_score(selection: list[str]) -> float:
        return probe_miou(tr, tr_y, te, te_y, selection, n_classes)

    singles = {n: val_score([n]) for n in names}
    ranked = sorted(names, key=lambda n: -singles[n])
    rows = [{"name": n, "kind": info[n].kind, "shape": list(info[n].shape), "flags": sorted(info[n].flags),
             "val_miou": round(singles[n], 2)} for n in ranked]
    for row in rows[:10]:
        row["test_miou"] = round(test_score([row["name"]]), 2)
    by_kind: dict[str, list[float]] = {}
    for n in names:
        by_kind.setdefault(info[n].kind, []).append(singles[n])
    kinds = {k: {"n": len(v), "mean_val_miou": round(float(np.mean(v)), 2), "max_val_miou": round(float(np.max(v)), 2)}
             for k, v in sorted(by_kind.items(), key=lambda kv: -np.max(kv[1]))}

    shortlist = ranked[:12]  # greedy search over the strongest singles keeps the run to minutes
    path = greedy_selection(val_score, shortlist, args.max_picks, args.min_gain)
    chosen = path[-1][0]
    base = conventional(catalog)
    selections = {
        "best single activation (val)": [ranked[0]],
        "greedy selection (val)": chosen,
        "conventional: upsampler outputs + last up ViT output": base,
    }
    report = {name: {"features": sel, "channels": sum(info[n].shape[0] for n in sel),
                     "val_miou": round(val_score(sel), 2), "test_miou": round(test_score(sel), 2)}
              for name, sel in selections.items()}  # fmt: skip
    seconds = time.perf_counter() - t0
    write_json(args.out, {"model": args.model, "t": args.t, "n_train": args.n_train, "n_select": args.n_select,
                          "n_test": args.n_test, "selections": report, "greedy_path": path, "by_kind": kinds,
                          "activations": rows, "seconds": round(seconds, 1)})  # fmt: skip

    print(f"\n| selection | val mIoU | test mIoU (n={args.n_test}) |\n|---|---|---|")
    for name, r in report.items():
        print(f"| {name} | {r['val_miou']:.1f} | {r['test_miou']:.1f} |")
    print("\n| activation | kind | val mIoU | test mIoU |\n|---|---|---|---|")
    for r in rows[:10]:
        print(f"| `{r['name']}` | {r['kind']} | {r['val_miou']:.1f} | {r['test_miou']:.1f} |")
    print("\n| kind | n | best val mIoU | mean val mIoU |\n|---|---|---|---|")
    for k, v in kinds.items():
        print(f"| {k} | {v['n']} | {v['max_val_miou']:.1f} | {v['mean_val_miou']:.1f} |")
    print(f"greedy path: {path}\n{seconds:.0f} s")


if __name__ == "__main__":
    main()
