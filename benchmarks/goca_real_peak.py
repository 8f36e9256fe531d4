"""Real peak memory of one GOCA segmentation of a full-size architecture (random weights) on the CPU, in one
pass vs two (``SegmentSettings.memory``): each mode in a fresh process builds the pipeline (weights created
directly in ``--dtype``, text encoders cut to ``--text-layers`` layers: the denoiser and VAE are full size),
prepares one image, runs a bare denoiser forward, then observes and decides; reported are the bare forward's
peak RSS, the growth of the peak over it (``VmHWM`` reset in between), the maps the observation keeps, and the
observed forward's time over the bare forward's (one sample each). The maps are fp32 whatever the dtype.

    flock /tmp/difffeat-heavy.lock python benchmarks/goca_real_peak.py --arch sdxl --resolution 1024

Output: ``benchmarks/results/goca_real_peak_<arch>_<resolution>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from difffeat.io import write_json

CHILD = "import json, sys; sys.path.insert(0, 'benchmarks'); from goca_real_peak import child; print('RESULT', json.dumps(child(*sys.argv[1:])))"


def child(arch: str, resolution: str, dtype: str, text_layers: str, passes: str) -> dict:
    import torch

    from difffeat.architectures import build_pipeline
    from difffeat.backbones import load
    from difffeat.devtools.bench_real import _peak_rss_mb, _reset_peak_rss, benchmark_image
    from difffeat.segment import Segmenter
    from difffeat.segment.prompts import build_layout

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    res = int(resolution)
    torch.set_default_dtype(torch_dtype)  # weights created in the dtype: no fp32 copy of the model at any time
    try:
        pipe = build_pipeline(arch, dtype=torch_dtype, text_layers=int(text_layers))
    finally:
        torch.set_default_dtype(torch.float32)
    seg = Segmenter(load(pipe, dtype=torch_dtype), resolution=res, memory=passes)
    s = seg.settings
    image = benchmark_image(res)
    layout = build_layout(["cat", "dog"], seg.backbone.text_segments(), s.template, list(s.background_entities), None)
    inputs = seg.backbone.prepare([image], layout.caption, s.t, s.seed, res)
    seg.map_geometry(inputs)  # the catalog's shape probe, cached: not part of the timed observation
    assert seg.passes(inputs) == passes
    _reset_peak_rss()
    start = time.perf_counter()
    seg.backbone.denoise(inputs)
    bare_s = time.perf_counter() - start
    base = _peak_rss_mb()
    _reset_peak_rss()
    start = time.perf_counter()
    obs = seg.observe_prepared([image], [layout], inputs)[0]
    observe_s = time.perf_counter() - start
    after_observe = _peak_rss_mb()
    seg.decide(obs)
    after_decide = _peak_rss_mb()
    held = [*obs.activations.values()] + ([obs.refine_mean] if obs.refine_mean is not None else [])
    return {"bare_peak_mb": round(base, 1), "observe_extra_peak_mb": round(max(0.0, after_observe - base), 1),
            "segment_extra_peak_mb": round(max(0.0, after_decide - base), 1),
            "kept_maps_mb": round(sum(x.numel() * x.element_size() for x in held) / 2**20, 1),
            "bare_forward_s": round(bare_s, 2), "observe_s": round(observe_s, 2),
            "observe_vs_bare_forward": round(observe_s / bare_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sdxl")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--text-layers", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = {"arch": args.arch, "resolution": args.resolution, "dtype": args.dtype, "text_layers": args.text_layers,
           "command": f"python benchmarks/goca_real_peak.py --arch {args.arch} --resolution {args.resolution} "
                      f"--dtype {args.dtype} --text-layers {args.text_layers}",
           "memory_measure": "peak RSS (VmHWM), fresh process per mode", "modes": {}}
    for passes in ("one-pass", "two-pass"):
        cmd = [sys.executable, "-c", CHILD, args.arch, str(args.resolution), args.dtype, str(args.text_layers), passes]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{passes} failed:\n{proc.stderr[-3000:]}")
        out["modes"][passes] = json.loads(line[len("RESULT "):])
        print(passes, out["modes"][passes], file=sys.stderr, flush=True)
    out["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out or f"benchmarks/results/goca_real_peak_{args.arch}_{args.resolution}.json", out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
