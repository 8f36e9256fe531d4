"""The activation paper's downstream tasks on the embedded shapes model, trained vs random weights.

Parts (``--parts``: by default all three, the cheap measurements first; each resumable; results merge into ``--out``):

* ``scarce``: label-scarce segmentation (``difffeat probe``'s library call: an ensemble of 10 published MLPs, batch
  64, early stopping, ensemble vote; 3 random re-splits averaged, the paper 5). One pool of ``--pool-train``
  val-split scenes and ``--pool-test`` test-split scenes; split ``s`` shuffles the whole pool with seed ``s`` (the reference's
  ``shuffle_split``), its first k scenes train, the next ``--pool-test`` test. mIoU over the 9 classes on the
  scenes' own 64 px label grid, per k, preset and weights.
* ``correspond``: semantic correspondence (``difffeat correspond``'s library call, nearest neighbour on
  features) on shape pairs of :mod:`difffeat.shapes.pairs` (same class at other positions, sizes, colours,
  backgrounds; centre and corners as keypoints) written as an SPair-71k tree; PCK@0.1 per image and per box.
* ``rank``: activation ranking (``difffeat probe --rank --all-kinds``): every activation but the maps, scored by
  the linear probe on the first split's k = ``--rank-k`` training scenes, tested on ``--pool-test``; repeated
  for each of ``--rank-seeds`` (other split and pixel sample); per-kind and per-block means, the presets' ranks.

The random-weight model has the same architecture with fresh (seeded) UNet and text-encoder weights; the VAE
stays trained. Features, trained classifiers and each configuration's accumulated wall seconds live under
``--work`` (default ``runs/downstream_shapes``), so a run stopped by ``--budget-min`` (checked between
configurations) or killed (``timeout``) continues where it stopped when started again with the same options.

    python benchmarks/downstream_shapes.py --budget-min 9          # rerun until it prints "all done"
    # on 2 cores, the two halves side by side (1 thread each), the pair rerun until both print "all done":
    python benchmarks/downstream_shapes.py --weights trained --rank-weights trained --budget-min 9 &
    python benchmarks/downstream_shapes.py --weights random --rank-weights random --budget-min 9; wait
    python benchmarks/downstream_shapes.py --parts correspond --pairs 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import difffeat
from difffeat.evaluate.pixel_ensemble import ScarceProtocol
from difffeat.evaluate.scarce_data import LabelledSet, image_label_folders
from difffeat.evaluate.spair import spair_pairs
from difffeat.io import write_json
from difffeat.runs.correspond import CorrespondJob, run_correspond
from difffeat.runs.rank import rank_activations
from difffeat.runs.scarce import ProbeJob, run_probe
from difffeat.shapes import world
from difffeat.shapes.pairs import shape_pair


class BudgetReached(Exception):
    pass


def backbone(weights: str) -> difffeat.Backbone:
    """The embedded shapes model, or the same architecture with seeded fresh UNet and text-encoder weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    trained = difffeat.load("shapes", device="cpu")
    if weights == "trained":
        return trained
    pipe = trained.pipeline
    torch.manual_seed(0)
    random_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": UNet2DConditionModel.from_config(pipe.unet.config),
                                             "text_encoder": CLIPTextModel(pipe.text_encoder.config)})  # fmt: skip
    return difffeat.load(random_pipe, device="cpu")


def write_pool(folder: Path, n_val: int, n_test: int) -> LabelledSet:
    """n_val val-split scenes then n_test test-split scenes as images/ + labels/ (name order = this order);
    written once per ``folder``."""
    def write(tmp: Path) -> None:
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir()
        scenes = [world.sample("val", i) for i in range(n_val)] + [world.sample("test", i) for i in range(n_test)]
        for j, s in enumerate(scenes):
            s.image.save(tmp / "images" / f"{j:04d}.png")
            Image.fromarray(s.mask.astype(np.uint8)).save(tmp / "labels" / f"{j:04d}.png")

    once(folder, write)
    data = image_label_folders(folder / "images", folder / "labels", 9)
    data.n_train = n_val  # the layout's training part; every split re-shuffles the whole pool
    return data


def once(folder: Path, write) -> None:
    """``write(tmp)`` into a fresh temporary folder renamed to ``folder``, unless ``folder`` exists (processes
    side by side: the first rename wins, the others' copies are dropped)."""
    import shutil

    if folder.exists():
        return
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process was first
        shutil.rmtree(tmp, ignore_errors=True)


def write_spair(folder: Path, n: int) -> Path:
    once(folder, lambda tmp: _write_spair(tmp, n))
    return folder


def _write_spair(folder: Path, n: int) -> None:
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


class Results:
    """``--out``, read when it exists and rewritten (atomically) after every measurement; several processes
    (e.g. ``--weights trained`` and ``--weights random`` side by side) merge their entries under a file lock."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.data = self._read()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def put(self, keys: list[str], value) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = self._read()
            d = self.data
            for k in keys[:-1]:
                d = d.setdefault(k, {})
            d[keys[-1]] = value
            write_json(self.path, self.data)


def timed(folder: Path, fn):
    """Run ``fn()``; add its wall seconds to ``folder/seconds.json`` (kept across resumed runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    ledger = folder / "seconds.json"
    before = json.loads(ledger.read_text()) if ledger.exists() else {"seconds": 0.0, "runs": 0}
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        write_json(ledger, {"seconds": before["seconds"] + time.perf_counter() - t0, "runs": before["runs"] + 1})


def seconds_of(folder: Path) -> dict:
    return json.loads((folder / "seconds.json").read_text())


def stamp() -> dict:
    return {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": [round(x, 2) for x in os.getloadavg()]}


def part_correspond(args, res: Results, work: Path, check_budget, arg: str | None = None) -> None:
    pairs = spair_pairs(write_spair(work / f"SPair{args.pairs}", args.pairs))
    for preset in args.presets:
        for weights in args.weights:
            if "pck_img" in res.data.get("correspondence", {}).get(preset, {}).get(weights, {}):
                continue
            check_budget()
            fx = difffeat.FeatureExtractor(backbone(weights), preset=preset, square=True)
            start = stamp()
            folder = work / f"corr-{preset}-{weights}"
            rep = timed(folder, lambda: run_correspond(fx, pairs, CorrespondJob(folder / "run", load_size=(64, 64), progress=False)))
            res.put(["correspondence", preset, weights], {**rep.scores, "pairs_written": args.pairs, "started": start,
                                                          "finished": stamp(), **seconds_of(folder)})
            print(f"correspond {preset} {weights}: PCK img {rep.scores['pck_img']:.4f} bbox {rep.scores['pck_bbox']:.4f}", flush=True)


def part_scarce(args, res: Results, work: Path, check_budget, arg: str | None = None) -> None:
    data = write_pool(work / f"pool{args.pool_train}-{args.pool_test}", args.pool_train, args.pool_test)
    protocol = ScarceProtocol(models=args.models, splits=args.splits, label_size=args.label_size)
    for k in args.ks if arg is None else [int(arg)]:
        for preset in args.presets:
            for weights in args.weights:
                done = res.data.get("label_scarce", {}).get(f"k={k}", {}).get(preset, {}).get(weights, {})
                if done.get("protocol") == protocol.to_json():
                    continue
                check_budget()
                fx = difffeat.FeatureExtractor(backbone(weights), preset=preset)
                folder = work / f"probe-k{k}-{preset}-{weights}"
                start = stamp()
                rep = timed(folder, lambda: run_probe(fx, data, ProbeJob(folder / "run", protocol, train_count=k,
                                                                         test_count=args.pool_test, progress=False)))
                res.put(["label_scarce", f"k={k}", preset, weights], {
                    "miou_mean": rep.miou_mean, "miou_std": rep.miou_std, "miou_per_split": rep.miou_per_split,
                    "class_iou_mean": rep.class_iou_mean, "n_train": rep.n_train, "n_test": rep.n_test,
                    "protocol": protocol.to_json(), "started": start, "finished": stamp(), **seconds_of(folder)})
                print(f"scarce k={k} {preset} {weights}: {rep.miou_mean:.4f} +- {rep.miou_std:.4f} "
                      f"({seconds_of(folder)['seconds']:.0f} s)", flush=True)


def summarise_ranking(rows: list[dict]) -> dict:
    """Per-kind and per-block means and bests, and where the presets' activations rank."""
    by_kind: dict[str, list[float]] = {}
    by_block: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r["miou"])
        parts = r["name"].split(".")
        block = "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2]) if len(parts) > 1 else parts[0]
        by_block.setdefault(block, []).append(r["miou"])
    order = lambda d: {k: float(np.mean(v)) for k, v in sorted(d.items(), key=lambda kv: -np.mean(kv[1]))}  # noqa: E731
    place = {r["name"]: i + 1 for i, r in enumerate(rows)}
    presets = {}
    for name in ("shapes-practical", "shapes-legacy"):
        from difffeat.presets import load_preset

        presets[name] = {f: place.get(f) for f in load_preset(name).features}
    return {"kind_mean_miou": order(by_kind), "kind_best_miou": {k: float(np.max(v)) for k, v in by_kind.items()},
            "block_mean_miou": order(by_block), "top10": [(r["name"], r["kind"]) for r in rows[:10]],
            "preset_ranks": presets, "activations": len(rows)}


def part_rank(args, res: Results, work: Path, check_budget, arg: str | None = None) -> None:
    data = write_pool(work / f"pool{args.pool_train}-{args.pool_test}", args.pool_train, args.pool_test)
    for weights in args.rank_weights:
        for seed in args.rank_seeds if arg is None else [int(arg)]:
            if str(seed) in res.data.get("ranking", {}).get(weights, {}):
                continue
            check_budget()
            model = backbone(weights)
            folder = work / f"rank-{weights}-seed{seed}"
            start = stamp()
            rows = timed(folder, lambda: rank_activations(model, data, train_count=args.rank_k, test_count=args.pool_test,
                                                          seed=seed, candidates_only=False, progress=False))
            rows = [r.to_json() for r in rows]
            res.put(["ranking", weights, str(seed)], {"rows": rows, **summarise_ranking(rows), "train_count": args.rank_k,
                                                      "test_count": args.pool_test, "started": start, "finished": stamp(),
                                                      **seconds_of(folder)})
            print(f"rank {weights} seed {seed}: top 5 {[(r['name'], round(r['miou'], 3)) for r in rows[:5]]}", flush=True)


PARTS = {"correspond": part_correspond, "scarce": part_scarce, "rank": part_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="scarce:5,rank:0,correspond,scarce:20,rank:1,rank:2",
                    help="in this order; scarce:K only k = K, rank:S only seed S (the cheap ones first on a shared CPU)")
    ap.add_argument("--presets", default="shapes-practical,shapes-legacy")
    ap.add_argument("--weights", default="trained,random")
    ap.add_argument("--ks", default="5,20", help="labelled training scenes per split")
    ap.add_argument("--pool-train", type=int, default=20, help="val-split scenes in the pool (>= the largest k)")
    ap.add_argument("--pool-test", type=int, default=30, help="test scenes per split (test-split scenes in the pool)")
    ap.add_argument("--splits", type=int, default=3, help="random re-splits (the paper: 5; 3 to fit the shared CPU)")
    ap.add_argument("--models", type=int, default=10, help="MLPs per ensemble (the paper: 10)")
    ap.add_argument("--label-size", type=int, default=64, help="label grid (64: the scenes' own masks)")
    ap.add_argument("--pairs", type=int, default=48, help="shape pairs (cycling through the 8 classes)")
    ap.add_argument("--rank-k", type=int, default=20)
    ap.add_argument("--rank-seeds", default="0,1,2")
    ap.add_argument("--rank-weights", default="trained,random")
    ap.add_argument("--budget-min", type=float, default=None, help="start no new configuration after this many minutes")
    ap.add_argument("--work", default="runs/downstream_shapes")
    ap.add_argument("--out", default="benchmarks/results/downstream_shapes.json")
    args = ap.parse_args()
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    args.presets, args.weights, args.rank_weights = split(args.presets), split(args.weights), split(args.rank_weights)
    args.ks, args.rank_seeds = [int(k) for k in split(args.ks)], [int(s) for s in split(args.rank_seeds)]
    if max(args.ks) > args.pool_train:
        raise SystemExit(f"--pool-train ({args.pool_train}) must be >= the largest k ({max(args.ks)})")
    # 1 thread by default: the classifiers are tiny (batch 64), and on the 2 shared cores a 2-thread step took
    # 15x the CPU time of a 1-thread step (spinning threads); DIFFFEAT_BENCH_THREADS=N to change
    torch.set_num_threads(int(os.environ.get("DIFFFEAT_BENCH_THREADS", 1)))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit("terminated; rerun to resume")))
    t0 = time.perf_counter()

    def check_budget() -> None:
        if args.budget_min is not None and time.perf_counter() - t0 > 60 * args.budget_min:
            raise BudgetReached

    res = Results(args.out)
    work = Path(args.work)
    print("start", stamp(), flush=True)
    try:
        for part in split(args.parts):
            name, _, arg = part.partition(":")
            PARTS[name](args, res, work, check_budget, arg or None)
        print("all done", flush=True)
    except BudgetReached:
        print(f"budget of {args.budget_min} min reached; rerun the same command to continue", flush=True)
    print("end", stamp(), f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
