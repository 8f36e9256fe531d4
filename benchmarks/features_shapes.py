"""Which activations of the embedded shapes model are discriminative features? A linear-probe benchmark.

The generic-diffusion-feature paper's claim, measured on the model difffeat ships: activations differ a lot
as features, and the conventional picks (block and upsampler outputs) are not the best ones. For every
capturable activation except attention maps, at one timestep:

1. features of ``--n-train`` val-split scenes train a per-pixel linear classifier (multinomial logistic
   regression on standardised features, bilinearly upsampled to 64x64; background + 8 shapes);
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
import torch.nn.functional as F

import difffeat
from difffeat.evaluate import ConfusionMatrix
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


class ProbeData:
    """Per-activation training pixels, cached: ``[n * pixels_per_image, C]`` sampled from the features
    upsampled (bilinearly) to 64x64 at fixed random pixels, and their labels."""

    def __init__(self, feats: dict[str, torch.Tensor], y_nHW: np.ndarray, pixels_per_image: int = 256, seed: int = 0) -> None:
        self.feats, n = feats, len(y_nHW)
        g = torch.Generator().manual_seed(seed)
        self.idx = torch.randint(0, SIZE * SIZE, (n, pixels_per_image), generator=g)
        self.y = torch.from_numpy(y_nHW.reshape(n, -1)).long().gather(1, self.idx).reshape(-1)
        self._x: dict[str, torch.Tensor] = {}

    def x(self, name: str) -> torch.Tensor:
        if name not in self._x:
            parts = []
            for i in range(0, len(self.idx), 32):
                f = upsample(self.feats[name][i : i + 32].float())
                c = f.shape[1]
                parts.append(f.flatten(2).gather(2, self.idx[i : i + 32, None, :].expand(-1, c, -1)).transpose(1, 2).reshape(-1, c))
            self._x[name] = torch.cat(parts).to(torch.float16)
        return self._x[name]


def upsample(x_nchw: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling to 64x64, as :func:`difffeat.upsample_concat` does."""
    if tuple(x_nchw.shape[-2:]) == (SIZE, SIZE):
        return x_nchw
    return F.interpolate(x_nchw, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


class LinearProbe:
    """Per-pixel multinomial logistic regression on standardised, concatenated features (full-batch Adam).

    Prediction needs no 64x64 feature tensor: bilinear upsampling is linear and keeps constants, so the
    logits of the upsampled features equal the upsampled logits computed at each feature's own resolution.
    """

    def __init__(self, n_classes: int, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> None:
        self.n_classes, self.steps, self.lr, self.weight_decay, self.seed = n_classes, steps, lr, weight_decay, seed

    def fit(self, data: ProbeData, names: list[str]) -> "LinearProbe":
        self.names = list(names)
        x = torch.cat([data.x(n).float() for n in names], dim=1)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - self.mean) / self.std
        torch.manual_seed(self.seed)
        self.linear = torch.nn.Linear(x.shape[1], self.n_classes)
        opt = torch.optim.Adam(self.linear.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.steps):
            opt.zero_grad()
            F.cross_entropy(self.linear(x), data.y).backward()
            opt.step()
        return self

    @torch.no_grad()
    def logits(self, feats: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """``[n, classes, 64, 64]`` logits of images ``rows``."""
        w = self.linear.weight / self.std  # standardisation folded into the weights
        b = self.linear.bias - w @ self.mean
        out, c0 = b[None, :, None, None], 0
        for name in self.names:
            f = feats[name][rows].float()
            c = f.shape[1]
            out = out + upsample(torch.einsum("kc,nchw->nkhw", w[:, c0 : c0 + c], f))
            c0 += c
        return out

    def predict(self, feats: dict[str, torch.Tensor], rows: slice) -> np.ndarray:
        """``[n, 64, 64]`` uint8 labels."""
        return self.logits(feats, rows).argmax(1).to(torch.uint8).numpy()


def probe_miou(train: ProbeData, names: list[str], feats: dict[str, torch.Tensor], y_nHW: np.ndarray, n_classes: int) -> float:
    """mIoU (%) on ``feats``/``y_nHW`` of a linear probe on ``names`` trained on ``train``."""
    probe = LinearProbe(n_classes).fit(train, names)
    cm = ConfusionMatrix(n_classes)
    for i in range(0, len(y_nHW), 64):
        for p, gt in zip(probe.predict(feats, slice(i, i + 64)), y_nHW[i : i + 64]):
            cm.update(gt, p)
    return 100.0 * cm.miou()


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
    catalog = backbone.catalog()
    names = [a.name for a in catalog if not a.kind.endswith("-map")]
    fx = difffeat.FeatureExtractor(backbone, names, t=args.t, batch_size=32)
    n_classes = len(world.SHAPE_CLASSES) + 1
    (tr_img, tr_y), (se_img, se_y), (te_img, te_y) = (
        scenes("val", 0, args.n_train), scenes("val", args.n_train, args.n_select), scenes("test", 0, args.n_test))
    tr, se, te = extract(fx, tr_img), extract(fx, se_img), extract(fx, te_img)
    train = ProbeData(tr, tr_y)
    info = {a.name: a for a in catalog}

    def val_score(selection: list[str]) -> float:
        return probe_miou(train, selection, se, se_y, n_classes)

    def test_score(selection: list[str]) -> float:
        return probe_miou(train, selection, te, te_y, n_classes)

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
