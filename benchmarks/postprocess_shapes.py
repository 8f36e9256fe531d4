"""Post-processing on the embedded shapes model: none vs PAMR vs dense CRF (GOCA, oracle image labels).

    python benchmarks/postprocess_shapes.py --model shapes --n-val 100 --n-test 300 --out benchmarks/results/postprocess_shapes.json

Protocol (no tuning on the test split): GOCA with the model's config (``configs/goca/<model>.yaml``); one
forward per image; each post-processing row decides every tau of the grid from the same maps
(:meth:`SegmentationResult.with_tau` re-applies the post-processing), tau is chosen per row on ``--n-val``
``val`` images and the row is scored on ``--n-test`` ``test`` images at that tau. ``crf`` needs the
``difffeat[crf]`` extra. Also reported: the seconds each row's decisions took (all taus, both splits) as a
ratio to ``none`` measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np

import difffeat
from difffeat.evaluate import ShapesDataset
from difffeat.evaluate.runner import TauSweep
from difffeat.io import write_json
from difffeat.segment.postprocess import POSTPROCESS, check_postprocess

# the reference sweeps -0.4..0.4; extended upwards as in goca_shapes.py so no choice sits on the edge
TAUS = tuple(float(x) for x in np.round(np.linspace(-0.4, 1.0, 29), 3))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--methods", default=",".join(POSTPROCESS))
    p.add_argument("--out", default="benchmarks/results/postprocess_shapes.json")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        check_postprocess(m)  # unknown method or missing [crf] extra: fail before any forward

    seg = difffeat.Segmenter(difffeat.load(args.model, device=args.device, dtype="fp32"))
    classes = ShapesDataset("test", 1).classes
    sweep = TauSweep(len(classes) + 1, TAUS)
    seconds = {m: 0.0 for m in methods}
    start = time.perf_counter()
    for split, n in (("val", args.n_val), ("test", args.n_test)):
        data = ShapesDataset(split, n)
        for i in range(n):
            item = data[i]
            labels = item.present()
            result = seg(item.image, [classes[l - 1] for l in labels]) if labels else None
            rgb = np.array(item.image.convert("RGB"))
            for m in methods:
                r = None if result is None else replace(result, settings={**result.settings, "postprocess": m}, image=rgb)
                t0 = time.perf_counter()
                sweep.update(split, m, r, labels, item.gt)
                seconds[m] += time.perf_counter() - t0
    rows = sweep.rows()
    report = {
        "model": args.model,
        "method": seg.settings.method,
        "setting": "oracle image labels",
        "split": "test",
        "n_test": args.n_test,
        "tuning": {"split": "val", "n_val": args.n_val, "taus": list(TAUS)},
        "segment_settings": {k: v for k, v in seg.settings.to_dict().items() if k != "tau"},
        "rows": [{"postprocess": r["row"], **{k: v for k, v in r.items() if k != "row"},
                  "decision_seconds": round(seconds[r["row"]], 2),
                  "decision_time_vs_none": round(seconds[r["row"]] / seconds["none"], 2) if seconds.get("none") else None}
                 for r in rows],  # fmt: skip
        "seconds": round(time.perf_counter() - start, 1),
        "load_average": list(os.getloadavg()),
        "command": "python benchmarks/postprocess_shapes.py " + " ".join(argv or __import__("sys").argv[1:]),
    }
    write_json(args.out, report)
    for r in report["rows"]:
        print(f"{r['postprocess']:5s} mIoU {100 * r['miou']:.1f} (tau {r['tau']:+.2f} on val) "
              f"fg IoU {100 * r['foreground_iou']:.1f}  decisions x{r['decision_time_vs_none']}")


if __name__ == "__main__":
    main()
