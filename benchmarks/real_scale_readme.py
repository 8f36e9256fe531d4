"""Regenerate README's "Real-size architectures" table from the bench JSON under benchmarks/results/.

    python benchmarks/real_scale_readme.py          # rewrites the block between the README markers
    python benchmarks/real_scale_readme.py --check  # exit 1 if the README block is stale

Reads every ``benchmarks/results/bench_<arch>_<suite>_*.json`` written by ``difffeat bench SUITE --arch ARCH``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- real-scale:begin -->", "<!-- real-scale:end -->"
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # the JSON's torch name -> the --dtype value


def _command(r: dict) -> str:
    if "command" in r:
        return f"`{r['command']}`"
    cmd = f"difffeat bench {r['suite']} --arch {r['arch']} --resolution {r['resolution']} --repeats {r['repeats']}"
    if r.get("device", "cpu") not in ("cpu", "meta"):
        cmd += f" --device cuda --dtype {_DTYPES[r['dtype']]}"
    elif r.get("device") == "cpu" and r["dtype"] != "float32":  # fp32 is the CPU's default
        cmd += f" --dtype {_DTYPES[r['dtype']]}"
    if r.get("text_layers") is not None:
        cmd += f" --text-layers {r['text_layers']}"
    return f"`{cmd}`"


def _where(r: dict) -> str:
    load = r.get("load_average_1_5_15")
    dev = r.get("device", "cpu")
    if dev == "meta":
        return "meta device (no forward)"
    return f"{dev}, {r['dtype']}, {r['threads']} threads" + (f", load {load[0]}" if load else "")


def _rows(r: dict) -> list[tuple[str, str]]:
    if r["suite"] == "goca":
        v = r["vs_bare_forward"]
        rows = [
            ("GOCA segment end to end vs bare forward", f"{v['end_to_end']}x"),
            ("GOCA end to end vs prepare + bare forward", f"{r['end_to_end_vs_prepare_plus_bare']}x"),
            ("prepare (VAE + text + noise) / observed forward / decide, vs bare forward",
             f"{v['prepare']}x / {v['observed']}x / {v['decide']}x"),
            ("maps kept by the observer vs every head's maps", f"{r['kept_maps_mb']} MB vs {r['kept_maps_every_head_mb']} MB"),
        ]
        if "observed_two_pass" in v:
            rows.append(("observed forward in two passes (`memory=\"two-pass\"`) vs in one, each vs bare forward",
                         f"{v['observed_two_pass']}x vs {v['observed']}x"))
        if "memory_mb" in r:
            m = r["memory_mb"]
            rows.append(("extra peak memory of one segmentation over a bare forward",
                         f"+{m['segment_extra_peak_mb']:.0f} MB (observe alone +{m['observe_extra_peak_mb']:.0f} MB)"))
        return rows
    if r["suite"] == "features":
        rows = []
        for preset, p in r["presets"].items():
            v = p["vs_bare_forward"]
            rows += [(f"{preset} capture forward, no early exit / early exit (after {p['early_exit_after']}), vs bare forward",
                      f"{v['forward_full']}x / {v['forward_early_exit']}x"),
                     (f"{preset} extraction end to end vs prepare + bare forward", f"{p['end_to_end_vs_prepare_plus_bare']}x")]
        return rows
    if r["suite"] == "early-exit":
        return [("forward stopped after each up level's output, vs bare forward: time (FLOPs)",
                 ", ".join(f"`{name}` {v}x ({r['flops_vs_bare_forward'][name]}x)" for name, v in r["vs_bare_forward"].items()))]
    if r["suite"] == "throughput":
        return [("segment images/s by batch size (vs batch 1)",
                 ", ".join(f"{b}: {ips} ({r['vs_batch_1'][b]}x)" for b, ips in r["images_per_s"].items()))]
    if r["suite"] == "accounting":
        rows = [("fp32 maps kept (cross maps, self maps reduced to the reference grid, one refinement sum, the reference feature) vs "
                 "a head-mean self map per block vs every head's maps; cross maps alone",
                 f"{r['kept_maps_mb'] / 1024:.2f} GiB vs {r['kept_maps_full_self_mb'] / 1024:.2f} GiB vs "
                 f"{r['kept_maps_every_head_mb'] / 1024:.1f} GiB; {r['cross_maps_only_mb']:.0f} MiB")]
        if "kept_maps_two_pass_mb" in r:
            rows.append(("fp32 maps kept in one pass vs two passes (`memory=\"two-pass\"`); what `memory=\"auto\"` "
                         f"picks (budget {r['map_budget_mb'] / 1024:g} GiB); the first pass's FLOPs vs a bare forward",
                         f"{r['kept_maps_mb'] / 1024:.2f} GiB vs {r['kept_maps_two_pass_mb'] / 1024:.2f} GiB; "
                         f"{r['auto_passes']}; {r['first_pass_flops_vs_bare']}x of {r['bare_forward_gflops']:.0f} GFLOPs"))
        return rows
    if r["suite"] == "goca-memory":
        rows = []
        for passes, m in r["modes"].items():
            if "skipped" in m:
                rows.append((f"{passes}: not run ({m['skipped']})", f"accounted {m['accounted_kept_maps_mb'] / 1024:.2f} GiB"))
                continue
            rows.append((f"{passes}: maps kept measured (accounted); extra peak RSS of a segmentation over a bare forward; "
                         "observed forward vs bare forward (small channels: not SDXL's time)",
                         f"{m['kept_maps_mb'] / 1024:.2f} GiB ({m['accounted_kept_maps_mb'] / 1024:.2f} GiB); "
                         f"+{m['segment_extra_peak_mb'] / 1024:.2f} GiB (observe alone +{m['observe_extra_peak_mb'] / 1024:.2f} GiB); "
                         f"{m['observe_vs_bare_forward']}x"))
        return rows
    if r["suite"] == "vae":
        return [(f"VAE encode in {dt} vs fp32: time, latent / worst feature relative error",
                 f"{e['time_vs_fp32']}x, {e['latent_relative_error']} / {max(e['feature_relative_error'].values())}")
                for dt, e in r["encode_dtype"].items()]
    return []


def render(results_dir: Path = ROOT / "benchmarks" / "results") -> str:
    lines = [BEGIN, "", "| architecture, px | what | figure | command | machine |", "|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("bench_*.json")):
        r = json.loads(path.read_text())
        if "arch" not in r:
            continue
        for what, figure in _rows(r):
            lines.append(f"| {r['arch']}, {r['resolution']} | {what} | {figure} | {_command(r)} | {_where(r)} |")
    lines += ["", f"Generated by `python benchmarks/real_scale_readme.py` from `benchmarks/results/bench_*.json`.", "", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + render() + tail
    if args.check:
        return 0 if new == text else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
