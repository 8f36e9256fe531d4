"""What tracing and S-CFG cost: a 20-step generation with the full-size SD1.5 architecture (random weights,
``difffeat.architectures.build_pipeline("sd15")``) on the CPU, every variant in one run, interleaved:

- untraced: the pipeline's own call (CFG, guidance 7.5);
- traced: the same call under ``difffeat.trace`` (GOCA maps of every step streamed into the label map);
- traced-fused: the same with ``fuse_output=True`` (observed layers return the observer's ``P @ V``);
- cfg: ``guidance=SCFG(7.5, "cfg")`` (the denoiser-output rewrite alone; its images equal untraced);
- scfg-goca: S-CFG with GOCA masks (every step observed, masks and rate computed).

Reported: median wall time of ``--repeats`` runs, ratios traced / untraced and scfg-goca / cfg, and each
variant's peak RSS growth over the untraced call's peak (Linux ``VmHWM``, reset before each call).

    flock /tmp/difffeat-heavy.lock python benchmarks/generate_cost.py --resolution 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import difffeat
from difffeat.architectures import build_pipeline
from difffeat.devtools.bench_real import _peak_rss_mb, _reset_peak_rss  # noqa: PLC2701 - the benchmarks' own meters
from difffeat.io import write_json
from difffeat.tracing import SCFG

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a photo of a cat and a dog on the grass"
CLASSES = ["cat", "dog", "grass"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--text-layers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = build_pipeline("sd15", dtype=torch.float32, text_layers=args.text_layers)
    pipe.set_progress_bar_config(disable=True)
    backbone = difffeat.load(pipe, device="cpu", dtype="fp32")
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.resolution, width=args.resolution,
              output_type="latent")

    def call():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images

    variants = {
        "untraced": lambda: None,
        "traced": lambda: difffeat.trace(pipe, PROMPT, CLASSES),
        "traced-fused": lambda: difffeat.trace(pipe, PROMPT, CLASSES, fuse_output=True),
        "cfg": lambda: difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(7.5, "cfg")),
        "scfg-goca": lambda: difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(7.5, "scfg-goca")),
    }
    difffeat.catalog_of(backbone)  # the catalog probe is a one-off, not a generation's cost
    call()  # warm-up: first-call allocations and lazy initialisation are no variant's cost
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            tc = make()
            _reset_peak_rss()
            start = time.perf_counter()
            if tc is None:
                call()
            else:
                with tc:
                    call()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], _peak_rss_mb())
            print(name, round(times[name][-1], 2), "s", round(peaks[name]), "MB peak", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "arch": "sd15 (random weights)", "resolution": args.resolution, "steps": args.steps, "repeats": args.repeats,
        "device": "cpu", "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "seconds": {k: round(v, 2) for k, v in med.items()},
        "traced_over_untraced": round(med["traced"] / med["untraced"], 3),
        "traced_fused_over_untraced": round(med["traced-fused"] / med["untraced"], 3),
        "scfg_goca_over_cfg": round(med["scfg-goca"] / med["cfg"], 3),
        "cfg_over_untraced": round(med["cfg"] / med["untraced"], 3),
        "extra_peak_mb_over_untraced": {k: round(peaks[k] - peaks["untraced"], 1) for k in variants if k != "untraced"},
        "untraced_peak_mb": round(peaks["untraced"], 1),
    }
    write_json(args.out or RESULTS / f"generate_cost_sd15_{args.resolution}.json", report)
    print(report)
    return report


if __name__ == "__main__":
    main()
