"""Print the README's Markdown tables from benchmarks/results/downstream_shapes.json and probe_memory_shapes.json."""

from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).parent / "results"


def main() -> None:
    d = json.loads((RES / "downstream_shapes.json").read_text())
    print("| k labelled scenes | preset | trained mIoU | random-weight mIoU |\n|---|---|---|---|")
    for k, by_preset in d["label_scarce"].items():
        for preset, row in by_preset.items():
            t, r = row["trained"], row["random"]
            print(f"| {k[2:]} | `{preset}` | {100 * t['miou_mean']:.1f} ± {100 * t['miou_std']:.1f} | "
                  f"{100 * r['miou_mean']:.1f} ± {100 * r['miou_std']:.1f} |")
    print("\n| preset | trained PCK@0.1 img / bbox | random-weight PCK@0.1 img / bbox |\n|---|---|---|")
    for preset, row in d["correspondence"].items():
        t, r = row["trained"], row["random"]
        print(f"| `{preset}` | {100 * t['pck_img']:.1f} / {100 * t['pck_bbox']:.1f} | {100 * r['pck_img']:.1f} / {100 * r['pck_bbox']:.1f} |")
    if "ranking" in d:
        rk = d["ranking"]
        print("\ntop 10:")
        for i, r in enumerate(rk["rows"][:10]):
            print(f"| {i + 1} | `{r['name']}` | {r['kind']} | {'x'.join(map(str, r['shape']))} | {100 * r['miou']:.1f} |")
        print("kind means:", {k: round(100 * v, 1) for k, v in rk["kind_mean_miou"].items()})
        print("block means:", {k: round(100 * v, 1) for k, v in rk["block_mean_miou"].items()})
    m = RES / "probe_memory_shapes.json"
    if m.exists():
        mm = json.loads(m.read_text())
        print("\nmemory:", [(r["train_images"], round(r["peak_rss_mb"]), round(r["seconds"])) for r in mm["runs"]],
              "ratio", round(mm["ratio_100_over_10"], 3), "load", mm["load_before"], mm["load_after"])


if __name__ == "__main__":
    main()
