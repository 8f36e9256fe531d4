"""One bare denoiser forward of a real-size architecture (random weights), timed: what a `difffeat bench` row at
that resolution would cost per forward, for rows that had to run at a lower resolution on the shared CPU.

    python benchmarks/forward_time.py ARCH RESOLUTION [--dtype bf16] [--text-layers 2]
        [--out benchmarks/results/forward_time.json]

Builds the pipeline as `difffeat bench --arch ARCH` does, prepares one image (VAE + text + noise, timed once)
and times one bare forward after it (no warm-up: the first forward of a real-size model is what a row's warm-up
pays too). The result is merged into ``--out`` under ``"ARCH RESOLUTION DTYPE"`` with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch")
    ap.add_argument("resolution", type=int)
    ap.add_argument("--dtype", default=None, help="fp32 (default on the CPU), bf16 or fp16")
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "forward_time.json")
    args = ap.parse_args(argv)

    import torch

    from difffeat.architectures import canonical_architecture
    from difffeat.devtools.bench_real import _backbone, _environment, _peak_rss_mb, benchmark_image  # noqa: PLC2701 - the bench's builder, meters
    from difffeat.io import write_json

    arch = canonical_architecture(args.arch)
    t0 = time.perf_counter()
    backbone = _backbone(arch, "cpu", args.dtype, args.text_layers)
    t1 = time.perf_counter()
    inputs = backbone.prepare([benchmark_image(args.resolution)], "a photo of cat, dog, background", 100, 0, args.resolution)
    t2 = time.perf_counter()
    with torch.no_grad():
        backbone.denoise(inputs)
    t3 = time.perf_counter()
    row = {"arch": arch, "resolution": args.resolution, "text_layers": args.text_layers, **_environment("cpu", backbone),
           "build_s": round(t1 - t0, 1), "prepare_s": round(t2 - t1, 1), "bare_forward_s": round(t3 - t2, 1),
           "peak_rss_gb": round(_peak_rss_mb() / 1024, 2)}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[f"{arch} {args.resolution} {row['dtype']}"] = row
    write_json(args.out, dict(sorted(results.items())))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
