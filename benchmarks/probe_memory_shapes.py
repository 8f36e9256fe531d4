"""``difffeat probe`` streams: its peak RSS with 100 training images vs with 10 (same run of this script).

The published label-scarce code keeps every training image's upsampled features in RAM, so its memory grows
with the number of labelled images; ``difffeat probe`` caches the model-resolution features on disk and
streams pools of images through training. Both measured runs use the same 110 shapes scenes enlarged to 512 px
(labels from the world's exact masks), the 3-activation ``shapes-practical`` preset at 512 px, and the same
options except ``--train-count`` (10 test images each). Each run is a separate process
(``python -m difffeat.cli probe ...``) whose own peak RSS (``ru_maxrss``) is reported; target: ratio <= 1.1.

Steps (resumable; ``--budget-min`` bounds one invocation, so a shared machine can run it in short jobs):

1. prepare: ``probe --train-count 100`` into ``WORK/prep`` writes the 110 images' features (the extraction is
   the run engine's: resumable, a killed run continues); each prepare process's peak RSS is kept too.
2. measure: ``WORK/run10`` and ``WORK/run100`` get the prepared features (hard links), then the 10-image and
   the 100-image runs run one after the other in this invocation. Both find their features on disk, so the
   peaks compare the streamed training and prediction (extraction holds one image at a time either way).

    flock /tmp/difffeat-heavy.lock python benchmarks/probe_memory_shapes.py --budget-min 11   # until "measured"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from difffeat.io import write_json
from difffeat.shapes import world

CHILD = (
    "import resource, sys\n"
    "from difffeat.cli import app\n"
    "try:\n"
    "    app(sys.argv[1:], standalone_mode=False)\n"
    "finally:\n"
    "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)
N_IMAGES = 110
N_TEST = 10


def write_scenes(folder: Path, size: int) -> tuple[Path, Path]:
    images, labels = folder / "images", folder / "labels"
    if not (folder / "complete").exists():
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(exist_ok=True)
        for i in range(N_IMAGES):
            s = world.sample("val", i)  # 64 px scenes, enlarged (nearest) to --size
            s.image.resize((size, size), Image.NEAREST).save(images / f"{i:04d}.png")
            Image.fromarray(s.mask.astype(np.uint8)).resize((size, size), Image.NEAREST).save(labels / f"{i:04d}.png")
        (folder / "complete").write_text("")
    return images, labels


def run(images: Path, labels: Path, out: Path, k: int, size: int, opts: list[str], timeout: float | None) -> dict:
    cmd = [sys.executable, "-c", CHILD, "probe", "shapes", "--images", str(images), "--labels", str(labels),
           "--num-classes", "9", "--preset", "shapes-practical", "--resolution", str(size), "--train-count", str(k),
           "--test-count", str(N_TEST), "--out", str(out), "--device", "cpu", *opts]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")))
    rep = json.loads((out / "report.json").read_text())
    return {"train_images": k, "test_images": N_TEST, "peak_rss_mb": peak / 1024, "seconds": time.perf_counter() - t0,
            "miou": rep["miou_mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="scene size in px")
    ap.add_argument("--label-size", type=int, default=128)
    ap.add_argument("--budget-min", type=float, default=None, help="stop (resumable) after this many minutes")
    ap.add_argument("--work", default="runs/probe_memory_shapes")
    ap.add_argument("--out", default="benchmarks/results/probe_memory_shapes.json")
    args = ap.parse_args()
    opts = ["--label-size", str(args.label_size), "--splits", "1", "--models", "1", "--epochs", "1",
            "--batch-size", "1024", "--pool", "8"]
    t0 = time.perf_counter()
    remaining = lambda: None if args.budget_min is None else max(1.0, 60 * args.budget_min - (time.perf_counter() - t0))  # noqa: E731
    work = Path(args.work)
    images, labels = write_scenes(work / "scenes", args.size)
    prep, ledger = work / "prep", work / "prep_runs.json"
    prep_runs = json.loads(ledger.read_text()) if ledger.exists() else []
    stamp = lambda: {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": [round(x, 2) for x in os.getloadavg()]}  # noqa: E731
    if not (prep / "report.json").exists():
        start = stamp()
        try:
            row = run(images, labels, prep, 100, args.size, opts, remaining())
        except subprocess.TimeoutExpired:
            prep_runs.append({"finished": False, "features_on_disk": len(list((prep / "features").glob("*.safetensors"))),
                              "started": start, "ended": stamp()})
            write_json(ledger, prep_runs)
            print(f"prepare: budget reached with {prep_runs[-1]['features_on_disk']} of {N_IMAGES} feature files; "
                  "rerun to continue", flush=True)
            return
        prep_runs.append({**row, "finished": True, "started": start, "ended": stamp()})
        write_json(ledger, prep_runs)
        print("prepared:", row, flush=True)
        if args.budget_min is not None and remaining() < 100:  # the two measured runs take about a minute
            print("prepared; too little budget left to measure: rerun to measure", flush=True)
            return
    load_before = stamp()
    rows = []
    for k in (10, 100):
        out = work / f"run{k}"
        shutil.rmtree(out, ignore_errors=True)
        (out / "features").mkdir(parents=True)
        for f in (prep / "features").iterdir():
            os.link(f, out / "features" / f.name)
        rows.append(run(images, labels, out, k, args.size, opts, None))
        print("measured:", rows[-1], flush=True)
    channels = 64 + 128 + 64  # shapes-practical
    in_ram_mb = [r["train_images"] * channels * args.label_size**2 * 4 / 2**20 for r in rows]
    result = {
        "runs": rows, "ratio_100_over_10": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], "target": 1.1,
        "options": opts, "size": args.size, "prepare_runs": prep_runs,
        "upsampled_features_if_kept_in_ram_mb": dict(zip(("10", "100"), in_ram_mb)),
        "started": load_before, "ended": stamp(),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
