"""The two-pass observed forward with GOCA's layer-score reducers run concurrently on the chunk workers vs one
chunk at a time in row order (what happens to reducers not marked ``thread_safe``, as they were before), in one
process, interleaved with the bare forward: the full-size SD1.5 architecture (random weights) at 512 px, float32,
2 torch threads, alone and beside one busy-looping Python process that this script starts.

``serialized`` wraps each :class:`~difffeat.segment.layerscores.LayerScoreStream` reducer in a plain function
(no ``thread_safe`` attribute), so the observer gates it with ``InRowOrder``; everything else is the same code.
Reported per condition: median seconds of ``--rounds`` interleaved rounds (alternating which variant goes
first), the ratios vs the bare forward and concurrent / serialized, and whether the two variants' layer scores
and refinement mean are bit-equal (the same single-threaded kernels on the same chunks, score parts added in
row order).

    flock /tmp/difffeat-heavy.lock python benchmarks/two_pass_workers.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from difffeat.devtools import bench_real
from difffeat.segment import Segmenter
from difffeat.segment.layerscores import LayerScoreStream
from difffeat.segment.prompts import build_layout

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("alone", "loaded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "two_pass_workers_sd15_512.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seg = Segmenter(bench_real._backbone("sd15", "cpu", None, None), resolution=args.resolution)
    backbone, s = seg.backbone, seg.settings
    two = Segmenter(backbone, settings=s.update(memory="two-pass"))
    image = bench_real._image(args.resolution)
    layout = build_layout(bench_real._CAPTION_CLASSES, backbone.text_segments(), s.template,
                          list(s.background_entities), None)
    inputs = backbone.prepare([image], layout.caption, s.t, s.seed, args.resolution)
    concurrent = LayerScoreStream._reducer

    def serialized(self, name):
        reducer = concurrent(self, name)
        return lambda probs, **kw: reducer(probs, **kw)  # a plain function: called one chunk at a time

    def observe(variant: str):
        LayerScoreStream._reducer = concurrent if variant == "concurrent" else serialized
        try:
            return two.observe_prepared([image], [layout], inputs)[0]
        finally:
            LayerScoreStream._reducer = concurrent

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    rows = []
    with torch.no_grad():
        backbone.denoise(inputs)
        observe("concurrent")
        observe("serialized")
        for condition in args.conditions:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "loaded" else None
            try:
                load = os.getloadavg()
                t: dict[str, list[float]] = {"bare": [], "concurrent": [], "serialized": []}
                obs = {}
                for i in range(args.rounds):
                    t["bare"].append(timed(lambda: backbone.denoise(inputs))[0])
                    for variant in ("concurrent", "serialized") if i % 2 == 0 else ("serialized", "concurrent"):
                        seconds, obs[variant] = timed(lambda: observe(variant))
                        t[variant].append(seconds)
                    print(condition, i, {k: round(v[-1], 3) for k, v in t.items()}, flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            med = {k: statistics.median(v) for k, v in t.items()}
            rows.append({
                "condition": condition, "seconds": t, "median_seconds": med,
                "concurrent_vs_bare": round(med["concurrent"] / med["bare"], 3),
                "serialized_vs_bare": round(med["serialized"] / med["bare"], 3),
                "concurrent_vs_serialized": round(med["concurrent"] / med["serialized"], 3),
                "scores_bit_equal": torch.equal(obs["concurrent"].layer_scores, obs["serialized"].layer_scores),
                "refine_bit_equal": torch.equal(obs["concurrent"].refine_mean, obs["serialized"].refine_mean),
                "load_average_start": load, "load_average_end": os.getloadavg(),
            })
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "seconds"}), flush=True)
    result = {"command": "python benchmarks/two_pass_workers.py " + " ".join(sys.argv[1:]), "arch": "sd15",
              "resolution": args.resolution, "threads": args.threads, "cpu_count": os.cpu_count(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
