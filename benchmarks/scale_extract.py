"""Dataset-scale extraction: 2 CPU processes (accelerate launch) vs 1 on the same 200 images.

    python benchmarks/scale_extract.py [--n 200] [--out benchmarks/results/scale_extract.json]

Uses the shapes model if ``difffeat/weights/shapes/model_index.json`` exists, else a tiny random SD pipeline.
Reports the speed-up of the extraction loop (``extract_summary.json``: slowest process) and of the whole
command (including process start and model load). Both runs use 1 thread per process.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _images(folder: Path, n: int) -> None:
    from difffeat.shapes import world

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        world.sample("test", i).image.save(folder / f"img_{i:05d}.png")


def _run(processes: int, model: str, images: Path, out: Path, features: str, batch_size: int, workers: int) -> dict:
    args = ["extract", model, str(images), "--features", features, "--out", str(out), "--batch-size", str(batch_size),
            "--num-workers", str(workers)]
    if processes == 1:
        cmd = [sys.executable, "-m", "difffeat.cli", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "difffeat.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    summary = json.loads((out / "extract_summary.json").read_text())
    return {"processes": processes, "loop_seconds": summary["seconds"], "wall_seconds": wall, "written": summary["written"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_extract.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shapes = ROOT / "difffeat" / "weights" / "shapes" / "model_index.json"
        if shapes.is_file():
            model, kind = "shapes", "shapes model"
        else:
            from difffeat.testing import save_tiny_pipeline

            save_tiny_pipeline("sd", tmp / "model")
            model, kind = str(tmp / "model"), "tiny random SD pipeline"
        _images(tmp / "images", a.n)
        features = "down_blocks.1.resnets.0,up_blocks.1.attentions.0"
        one = _run(1, model, tmp / "images", tmp / "out1", features, a.batch_size, a.num_workers)
        two = _run(2, model, tmp / "images", tmp / "out2", features, a.batch_size, a.num_workers)
    figures = {
        "benchmark": "scale_extract", "model": kind, "images": a.n, "batch_size": a.batch_size,
        "num_workers": a.num_workers, "cpu_count": os.cpu_count(), "one_process": one, "two_processes": two,
        "speedup_loop": one["loop_seconds"] / two["loop_seconds"],
        "speedup_wall": one["wall_seconds"] / two["wall_seconds"],
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(figures, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    from difffeat.io import write_json

    write_json(a.out, figures)
    print(f"speed-up 2 vs 1 process: {figures['speedup_loop']:.2f}x (extraction loop), {figures['speedup_wall']:.2f}x (whole command)")


if __name__ == "__main__":
    main()
