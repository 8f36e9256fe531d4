"""The activation paper's downstream tasks on the embedded shapes model, trained vs random weights.

1. Label-scarce segmentation (``difffeat probe``'s library call: the published MLPs, batch 64, early stopping,
   voting, random re-splits averaged; by default 3 MLPs and 3 splits instead of 10 and 5, and a 32 px label
   grid, to fit CPU time): k = 5 and k = 20 labelled val-split scenes, the rest of a pool of ``--pool-test``
   test-split scenes held out; mIoU (9 classes) per preset.
2. Semantic correspondence (``difffeat correspond``'s library call, nearest neighbour on features): shape
   pairs of :mod:`difffeat.shapes.pairs` (same class at other positions, sizes, colours, backgrounds;
   centre and corners as keypoints) written as an SPair-71k tree; PCK@0.1 per image and per box.
3. Activation ranking (``difffeat probe --rank``): every candidate activation on k = 20 scenes; per-kind
   means and the top of the table, to compare with the paper's finding (ViT-module activations, not the
   conventional resnet/block outputs, are the best features; noisy kinds rank low).

The random-weight baseline has the same architecture with fresh UNet and text-encoder weights (the VAE stays
trained). Output: ``benchmarks/results/downstream_shapes.json``.

    flock /tmp/difffeat-heavy.lock python benchmarks/downstream_shapes.py
    python benchmarks/downstream_shapes.py --splits 1 --models 2 --pairs 16 --quick   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import difffeat
from difffeat.evaluate.pixel_ensemble import ScarceProtocol
from difffeat.evaluate.scarce_data import image_label_folders
from difffeat.evaluate.spair import spair_pairs
from difffeat.io import write_json
from difffeat.runs.correspond import CorrespondJob, run_correspond
from difffeat.runs.rank import rank_activations
from difffeat.runs.scarce import ProbeJob, run_probe
from difffeat.shapes import world
from difffeat.shapes.pairs import shape_pair

PRESETS = ("shapes-practical", "shapes-legacy")


def backbones() -> dict[str, difffeat.Backbone]:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    trained = difffeat.load("shapes", device="cpu")
    pipe = trained.pipeline
    torch.manual_seed(0)
    random_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": UNet2DConditionModel.from_config(pipe.unet.config),
                                             "text_encoder": CLIPTextModel(pipe.text_encoder.config)})  # fmt: skip
    return {"trained": trained, "random": difffeat.load(random_pipe, device="cpu")}


def write_pool(folder: Path, k: int, n_test: int) -> tuple[Path, Path]:
    """k val-split scenes then n_test test-split scenes as images/ + labels/ (name order = this order)."""
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    scenes = [world.sample("val", i) for i in range(k)] + [world.sample("test", i) for i in range(n_test)]
    for j, s in enumerate(scenes):
        s.image.save(images / f"{j:04d}.png")
        Image.fromarray(s.mask.astype(np.uint8)).save(labels / f"{j:04d}.png")
    return images, labels


def write_spair(folder: Path, n: int) -> Path:
    ann = folder / "PairAnnotation" / "test"
    ann.mkdir(parents=True)
    for i in range(n):
        p = shape_pair("test", i)
        img_dir = folder / "JPEGImages" / p.class_name
        img_dir.mkdir(parents=True, exist_ok=True)
        src, tgt = f"{i:05d}_a.png", f"{i:05d}_b.png"
        p.source.save(img_dir / src)
        p.target.save(img_dir / tgt)
        (ann / f"{i:06d}-{src[:-4]}-{tgt[:-4]}:{p.class_name}.json").write_text(json.dumps({
            "src_imname": src, "trg_imname": tgt, "category": p.class_name, "src_kps": p.source_xy,
            "trg_kps": p.target_xy, "trg_bndbox": list(p.target_bbox)}))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="5,20", help="labelled training scenes per split")
    ap.add_argument("--pool-test", type=int, default=30, help="held-out test-split scenes in the pool")
    ap.add_argument("--splits", type=int, default=3, help="random re-splits (the paper: 5; fewer for CPU time)")
    ap.add_argument("--models", type=int, default=3, help="MLPs per ensemble (the paper: 10; fewer for CPU time)")
    ap.add_argument("--label-size", type=int, default=32, help="label grid (the 64 px scenes' masks downsampled; features are 8-16 px)")
    ap.add_argument("--pairs", type=int, default=48, help="shape pairs (cycling through the 8 classes)")
    ap.add_argument("--rank-k", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="skip the ranking")
    ap.add_argument("--out", default="benchmarks/results/downstream_shapes.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("DIFFFEAT_BENCH_THREADS", 2)))
    models = backbones()
    ks = [int(k) for k in args.ks.split(",")]
    results: dict = {"args": vars(args), "load_before": os.getloadavg()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. label-scarce segmentation
        scarce = {}
        for k in ks:
            images, labels = write_pool(tmp / f"pool{k}", k, args.pool_test)
            data = image_label_folders(images, labels, 9)
            data.n_train = k  # the first k (val scenes) are the given training part; splits re-shuffle the pool
            for preset in PRESETS:
                for label, backbone in models.items():
                    fx = difffeat.FeatureExtractor(backbone, preset=preset)
                    t0 = time.perf_counter()
                    rep = run_probe(fx, data, ProbeJob(tmp / f"probe-{k}-{preset}-{label}",
                                                       ScarceProtocol(models=args.models, splits=args.splits, label_size=args.label_size),
                                                       train_count=k, progress=False))
                    scarce.setdefault(f"k={k}", {}).setdefault(preset, {})[label] = {
                        "miou_mean": rep.miou_mean, "miou_std": rep.miou_std, "miou_per_split": rep.miou_per_split,
                        "seconds": time.perf_counter() - t0}
                    print(f"scarce k={k} {preset} {label}: {rep.miou_mean:.4f} +- {rep.miou_std:.4f}", flush=True)
        results["label_scarce"] = scarce
        # 2. correspondence
        root = write_spair(tmp / "SPair", args.pairs)
        pairs = spair_pairs(root)
        corr = {}
        for preset in PRESETS:
            for label, backbone in models.items():
                fx = difffeat.FeatureExtractor(backbone, preset=preset, square=True)
                rep = run_correspond(fx, pairs, CorrespondJob(tmp / f"corr-{preset}-{label}", load_size=(64, 64), progress=False))
                corr.setdefault(preset, {})[label] = rep.scores
                print(f"correspond {preset} {label}: PCK img {rep.scores['pck_img']:.4f} bbox {rep.scores['pck_bbox']:.4f}", flush=True)
        results["correspondence"] = corr
        # 3. ranking
        if not args.quick:
            images, labels = write_pool(tmp / "rankpool", args.rank_k, args.pool_test)
            data = image_label_folders(images, labels, 9)
            data.n_train = args.rank_k
            # every activation but the maps: the noisy kinds the paper drops are ranked too, to check the claim
            rows = rank_activations(models["trained"], data, train_count=args.rank_k, candidates_only=False, progress=False)
            by_kind: dict[str, list[float]] = {}
            by_block: dict[str, list[float]] = {}
            for r in rows:
                by_kind.setdefault(r.kind, []).append(r.miou)
                parts = r.name.split(".")
                by_block.setdefault(".".join(parts[:2]) if parts[0] != "mid_block" else "mid_block", []).append(r.miou)
            order = lambda d: {k: float(np.mean(v)) for k, v in sorted(d.items(), key=lambda kv: -np.mean(kv[1]))}  # noqa: E731
            results["ranking"] = {
                "rows": [r.to_json() for r in rows],
                "kind_mean_miou": order(by_kind),
                "kind_best_miou": {k: float(np.max(v)) for k, v in by_kind.items()},
                "block_mean_miou": order(by_block),
                "top10_kinds": [r.kind for r in rows[:10]],
            }
            print("top 10:", [(r.name, round(r.miou, 4)) for r in rows[:10]], flush=True)
            print("kind means:", results["ranking"]["kind_mean_miou"], flush=True)
            print("block means:", results["ranking"]["block_mean_miou"], flush=True)
    results["seconds"] = time.perf_counter() - start
    results["load_after"] = os.getloadavg()
    write_json(args.out, results)
    print(f"wrote {args.out} ({results['seconds']:.0f} s; load {results['load_before']} -> {results['load_after']})")


if __name__ == "__main__":
    main()
