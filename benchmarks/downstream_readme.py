"""Print the README's Markdown tables from benchmarks/results/downstream_shapes.json and probe_memory_shapes.json.

    python benchmarks/downstream_readme.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RES = Path(__file__).parent / "results"
#: the activation paper's noisy kinds (dropped from its candidates)
NOISY = ("resnet-increment", "ff-inner", "self-v")
#: conventional features (resnet / sampler / level outputs) vs the ViT-internal ones the paper adds
CONVENTIONAL = ("resnet-out", "upsampler-out", "downsampler-out", "level-out")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def stage(name: str) -> str:
    """down / mid / up-first-half (up_blocks.0-1) / up-second-half (up_blocks.2) / other."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return "down"
    if parts[0] == "mid_block":
        return "mid"
    if parts[0] == "up_blocks":
        return "up 0-1" if int(parts[1]) < 2 else "up 2"
    return "in/out"


def ranking_table(runs: dict) -> None:
    """Activations ranked by their mIoU averaged over the seeds (splits and pixel samples)."""
    seeds = sorted(runs)
    by_name: dict[str, list[float]] = {}
    kind = {}
    for s in seeds:
        for r in runs[s]["rows"]:
            by_name.setdefault(r["name"], []).append(r["miou"])
            kind[r["name"]] = r["kind"]
    mean = {n: float(np.mean(v)) for n, v in by_name.items()}
    order = sorted(mean, key=lambda n: -mean[n])
    place = {n: i + 1 for i, n in enumerate(order)}
    print(f"seeds {seeds}; {len(order)} activations; k = {runs[seeds[0]]['train_count']}, "
          f"{runs[seeds[0]]['test_count']} test scenes; seconds per seed {[round(runs[s]['seconds']) for s in seeds]}")
    print("\n| rank | activation | kind | mIoU (mean over seeds) | per seed |\n|---|---|---|---|---|")
    for n in order[:12]:
        print(f"| {place[n]} | `{n}` | {kind[n]} | {pct(mean[n])} | {' / '.join(pct(x) for x in by_name[n])} |")
    groups = {
        "noisy kinds (resnet-increment, ff-inner, self-v)": [n for n in order if kind[n] in NOISY],
        "conventional outputs (resnet, samplers, levels)": [n for n in order if kind[n] in CONVENTIONAL],
        "ViT internals and outputs (q/k, attn out, block/ff/vit out)": [n for n in order if kind[n] not in NOISY + CONVENTIONAL
                                                                        and kind[n] not in ("input", "conv-in", "output")],
    }
    for st in ("down", "mid", "up 0-1", "up 2"):
        groups[f"stage {st}"] = [n for n in order if stage(n) == st]
    print("\n| group | activations | mean mIoU | best (rank) |\n|---|---|---|---|")
    for g, names in groups.items():
        print(f"| {g} | {len(names)} | {pct(np.mean([mean[n] for n in names]))} | {pct(mean[names[0]])} (#{place[names[0]]}) |")
    from difffeat.presets import load_preset

    for p in ("shapes-practical", "shapes-legacy"):
        feats = load_preset(p).features
        print(f"{p}: " + ", ".join(f"`{f}` #{place.get(f)} ({pct(mean[f])})" for f in feats))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=RES, help="folder of the two JSON files")
    res = ap.parse_args().results
    d = json.loads((res / "downstream_shapes.json").read_text())
    print("| k labelled scenes | preset | trained mIoU | random-weight mIoU | seconds (trained / random) |\n|---|---|---|---|---|")
    for k, by_preset in d.get("label_scarce", {}).items():
        for preset, row in by_preset.items():
            t, r = row.get("trained"), row.get("random")
            cell = lambda x: f"{pct(x['miou_mean'])} ± {pct(x['miou_std'])}" if x else "—"  # noqa: E731
            secs = " / ".join(f"{x['seconds']:.0f}" if x else "—" for x in (t, r))
            print(f"| {k[2:]} | `{preset}` | {cell(t)} | {cell(r)} | {secs} |")
        for preset, row in by_preset.items():
            for w, x in row.items():
                print(f"  k={k[2:]} {preset} {w}: started {x['started']}, finished {x['finished']}, {x['runs']} job(s)")
    print("\n| preset | trained PCK@0.1 img / bbox | random-weight PCK@0.1 img / bbox |\n|---|---|---|")
    for preset, row in d.get("correspondence", {}).items():
        t, r = row.get("trained"), row.get("random")
        cell = lambda x: f"{pct(x['pck_img'])} / {pct(x['pck_bbox'])}" if x else "—"  # noqa: E731
        print(f"| `{preset}` | {cell(t)} | {cell(r)} |")
    for weights, runs in d.get("ranking", {}).items():
        print(f"\nranking, {weights} weights:")
        ranking_table(runs)
    m = res / "probe_memory_shapes.json"
    if m.exists():
        mm = json.loads(m.read_text())
        print("\nmemory:", [(r["train_images"], round(r["peak_rss_mb"]), round(r["seconds"])) for r in mm["runs"]],
              "ratio", round(mm["ratio_100_over_10"], 3), mm["started"], mm["ended"],
              "prepare:", [(p.get("peak_rss_mb"), p.get("features_on_disk"), p["started"]) for p in mm["prepare_runs"]])


if __name__ == "__main__":
    main()
