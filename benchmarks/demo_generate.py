"""How long the demo's Generate tab takes on the shapes model (CPU): ``run_generation`` per guidance vs the
untraced pipeline call on the same prompt, steps and seed, interleaved, median of ``--repeats``.

    python benchmarks/demo_generate.py            # -> benchmarks/results/demo_generate.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from difffeat.demo import GENERATE_PROMPT, ModelCache, run_generation
from difffeat.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_generate.json")
    args = ap.parse_args(argv)
    model = ModelCache(device="cpu").get("shapes")
    pipe, size = model.backbone.pipeline, model.backbone.native_resolution
    load_before = os.getloadavg()[0]
    run_generation(model, GENERATE_PROMPT, "", guidance="scfg-goca", guidance_scale=args.guidance_scale, steps=args.steps)  # warm-up
    times: dict[str, list[float]] = {"untraced pipeline": [], "cfg": [], "scfg-goca": [], "scfg": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        pipe(GENERATE_PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=size, width=size,
             generator=torch.Generator().manual_seed(0))
        times["untraced pipeline"].append(time.perf_counter() - start)
        for mode in ("cfg", "scfg-goca", "scfg"):
            start = time.perf_counter()
            run_generation(model, GENERATE_PROMPT, "", guidance=mode, guidance_scale=args.guidance_scale, steps=args.steps)
            times[mode].append(time.perf_counter() - start)
    report = {"model": "shapes", "prompt": GENERATE_PROMPT, "steps": args.steps, "guidance_scale": args.guidance_scale,
              "repeats": args.repeats, "threads": torch.get_num_threads(),
              "median_seconds": {k: round(statistics.median(v), 2) for k, v in times.items()},
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    write_json(args.out, report)
    print(report)
    return report


if __name__ == "__main__":
    main()
