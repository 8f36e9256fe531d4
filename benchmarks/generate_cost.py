"""What tracing and S-CFG cost: a generation with the full-size SD1.5 architecture (random weights,
``difffeat.architectures.build_pipeline("sd15")``) on the CPU, the chosen variants in one run, interleaved:

- untraced: the pipeline's own call (CFG, guidance 7.5);
- traced: the same call under ``difffeat.trace`` with the defaults (``aggregate="maps"``: the conditional
  half's cross maps at every step, its self maps and reference feature at one step);
- traced-steps: ``aggregate="steps"`` (GOCA's decision at every step: self maps at every step);
- cfg: ``guidance=SCFG(7.5, "cfg")`` (the denoiser-output rewrite alone; its images equal untraced);
- scfg-goca: S-CFG with GOCA masks (both halves observed at every step, masks and rate computed);
- scfg-goca-fused: the same with ``fuse_output=True`` (observed layers return the observer's ``P @ V``).

Reported: median wall time of ``--repeats`` runs, the ratios traced / untraced, traced-steps / untraced and
scfg-goca / cfg (for the variants run), each variant's peak RSS growth over the untraced call's peak (Linux
``VmHWM``, reset before each call), and every denoiser call's wall time (``step_seconds``), from which
``projected_20_steps`` gives a traced / untraced ratio of 20 steps when fewer were run: the untraced step
median against 19 traced steps that observe cross maps only plus the traced self step (each as measured).

    flock /tmp/difffeat-heavy.lock python benchmarks/generate_cost.py --resolution 256 --variants untraced,traced
"""

from __future__ import annotations

import argparse
import os
import signal
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
VARIANTS = {
    "untraced": lambda pipe: None,
    "traced": lambda pipe: difffeat.trace(pipe, PROMPT, CLASSES),
    "traced-steps": lambda pipe: difffeat.trace(pipe, PROMPT, CLASSES, aggregate="steps"),
    "cfg": lambda pipe: difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(7.5, "cfg")),
    "scfg-goca": lambda pipe: difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(7.5, "scfg-goca")),
    "scfg-goca-fused": lambda pipe: difffeat.trace(pipe, PROMPT, CLASSES, guidance=SCFG(7.5, "scfg-goca"), fuse_output=True),
}
RATIOS = {"traced_over_untraced": ("traced", "untraced"), "traced_steps_over_untraced": ("traced-steps", "untraced"),
          "scfg_goca_over_cfg": ("scfg-goca", "cfg"), "scfg_goca_fused_over_cfg": ("scfg-goca-fused", "cfg"),
          "cfg_over_untraced": ("cfg", "untraced")}


class StepTimer:
    """Wall time of every denoiser call (a forward pre-hook and a forward hook on the denoiser)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds: list[float] = []
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, *_):
        self._start = time.perf_counter()

    def _after(self, *_):
        self.seconds.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--warmup-steps", type=int, default=1, help="steps of the untimed warm-up call")
    ap.add_argument("--text-layers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    pipe = build_pipeline("sd15", dtype=torch.float32, text_layers=args.text_layers)
    pipe.set_progress_bar_config(disable=True)
    backbone = difffeat.load(pipe, device="cpu", dtype="fp32")
    kw = dict(guidance_scale=7.5, height=args.resolution, width=args.resolution, output_type="latent")

    def call(steps: int):
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **kw).images

    difffeat.catalog_of(backbone)  # the catalog probe is a one-off, not a generation's cost
    call(args.warmup_steps)  # warm-up: first-call allocations and lazy initialisation are no variant's cost
    load_before = os.getloadavg()
    times = {k: [] for k in names}
    steps = {k: [] for k in names}
    peaks: dict[str, float] = {}
    self_steps: dict[str, int | None] = {}
    partial: dict[str, list[float]] = {}  # the denoiser calls of a variant stopped by a timeout (SIGTERM)

    def write_report() -> dict:
        med = {k: statistics.median(v) for k, v in times.items() if v}
        report: dict = {
            "arch": "sd15 (random weights)", "resolution": args.resolution, "steps": args.steps, "repeats": args.repeats,
            "variants": names, "device": "cpu", "threads": torch.get_num_threads(),
            "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "seconds": {k: round(v, 2) for k, v in med.items()},
            **{r: round(med[a] / med[b], 3) for r, (a, b) in RATIOS.items() if a in med and b in med},
            "step_seconds": steps,
            **({"cut_short": partial} if partial else {}),
            "self_step": self_steps,
            
        }
        base = "untraced" if "untraced" in peaks else ("cfg" if "cfg" in peaks else None)
        if base is not None:
            report[f"extra_peak_mb_over_{base}"] = {k: round(peaks[k] - peaks[base], 1) for k in names if k != base and k in peaks}
            report[f"{base}_peak_mb"] = round(peaks[base], 1)
        if steps.get("traced") and steps.get("untraced") and self_steps.get("traced") is not None:
            s = self_steps["traced"]
            per_untraced = statistics.median([x for run in steps["untraced"] for x in run])
            traced_self = statistics.median([run[s] for run in steps["traced"]])
            traced_cross = statistics.median([x for run in steps["traced"] for i, x in enumerate(run) if i != s])
            report["per_step_seconds"] = {"untraced": round(per_untraced, 3), "traced_cross_only": round(traced_cross, 3),
                                          "traced_self_step": round(traced_self, 3)}
            report["projected_20_steps"] = round((19 * traced_cross + traced_self) / (20 * per_untraced), 3)
        tag = "" if names == list(VARIANTS) else "_" + "-".join(names)
        write_json(args.out or RESULTS / f"generate_cost_sd15_{args.resolution}{tag}.json", report)
        return report

    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)  # `timeout` stops a run cut short: write what it measured first
    for _ in range(args.repeats):
        for name in names:
            tc = VARIANTS[name](pipe)
            timer = StepTimer(pipe.unet)
            _reset_peak_rss()
            start = time.perf_counter()
            try:
                if tc is None:
                    call(args.steps)
                else:
                    with tc:
                        call(args.steps)
            except SystemExit:
                partial[name] = [round(x, 3) for x in timer.seconds]
                write_report()
                raise
            finally:
                timer.remove()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0.0), _peak_rss_mb())
            steps[name].append([round(x, 3) for x in timer.seconds])
            if tc is not None and tc.aggregate == "maps" and tc.guidance is None:
                self_steps[name] = tc.used_self_step
            print(name, round(times[name][-1], 2), "s", round(peaks[name]), "MB peak", os.getloadavg(), flush=True)
            write_report()  # after every variant
    report = write_report()
    print(report)
    return report


if __name__ == "__main__":
    main()
