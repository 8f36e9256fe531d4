"""``difffeat probe`` streams: its peak RSS with 100 training images vs with 10 (same run of this script).

The published label-scarce code keeps every training image's upsampled features in RAM, so its memory grows
with the number of labelled images; ``difffeat probe`` caches the model-resolution features on disk and
streams pools of images through training. Both runs use the same 110 shapes scenes enlarged to 512 px (labels
from the world's exact masks), the 3-activation ``shapes-practical`` preset at 512 px, and the same options
except ``--train-count``. Each run is a separate process (``python -m difffeat.cli probe ...``) whose own peak
RSS (``ru_maxrss``) is reported; the target is ratio <= 1.1. Output: ``benchmarks/results/probe_memory_shapes.json``.

    flock /tmp/difffeat-heavy.lock python benchmarks/probe_memory_shapes.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def run(images: Path, labels: Path, out: Path, k: int, opts: list[str]) -> dict:
    cmd = [sys.executable, "-c", CHILD, "probe", "shapes", "--images", str(images), "--labels", str(labels),
           "--num-classes", "9", "--preset", "shapes-practical", "--resolution", "512", "--train-count", str(k),
           "--out", str(out), "--device", "cpu", *opts]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")))
    rep = json.loads((out / "report.json").read_text())
    return {"train_images": k, "peak_rss_mb": peak / 1024, "seconds": time.perf_counter() - t0, "miou": rep["miou_mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="scene size in px")
    ap.add_argument("--label-size", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/probe_memory_shapes.json")
    args = ap.parse_args()
    opts = ["--label-size", str(args.label_size), "--splits", "1", "--models", "1", "--epochs", "1",
            "--batch-size", "1024", "--test-count", "10", "--pool", "8"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, labels = tmp / "images", tmp / "labels"
        images.mkdir()
        labels.mkdir()
        for i in range(110):
            s = world.sample("val", i)  # 64 px scenes, enlarged (nearest) to --size
            s.image.resize((args.size, args.size), Image.NEAREST).save(images / f"{i:04d}.png")
            Image.fromarray(s.mask.astype(np.uint8)).resize((args.size, args.size), Image.NEAREST).save(labels / f"{i:04d}.png")
        rows = [run(images, labels, tmp / f"run{k}", k, opts) for k in (10, 100)]
    channels = 64 + 128 + 64  # shapes-practical
    in_ram_mb = [r["train_images"] * channels * args.label_size**2 * 4 / 2**20 for r in rows]
    result = {
        "runs": rows, "ratio_100_over_10": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], "target": 1.1,
        "options": opts, "size": args.size,
        "upsampled_features_if_kept_in_ram_mb": dict(zip(("10", "100"), in_ram_mb)),
        "load_before": load_before, "load_after": os.getloadavg(),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
