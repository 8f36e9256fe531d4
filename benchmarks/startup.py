"""Start-up time of the command line: `difffeat --help`, every command's `--help`, and an argument error,
against a bare `python -c pass` measured in the same run (median of N, alternated).

    python benchmarks/startup.py [--repeats 5] [--out benchmarks/results/startup.json]

The target (issue 18) is under 1 s on the 2-core development machine for `--help` and argument errors;
before lazy imports each took 5.6-5.8 s because `import difffeat` imported diffusers.
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

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = ["catalog", "families", "presets", "extract", "segment", "eval", "gate", "bench", "make-tiny", "demo"]
CASES = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "difffeat --help": [sys.executable, "-m", "difffeat.cli", "--help"],
    **{f"difffeat {c} --help": [sys.executable, "-m", "difffeat.cli", c, "--help"] for c in COMMANDS},
    "difffeat segment (argument error: --tau nan)": [sys.executable, "-m", "difffeat.cli", "segment", "x.png", "-c",
                                                     "cat", "-o", "/tmp/difffeat_startup", "--tau", "nan"],
    "difffeat eval (argument error: --n 0)": [sys.executable, "-m", "difffeat.cli", "eval", "--shapes-split", "test",
                                              "--n", "0", "--out", "/tmp/difffeat_startup"],
}


def _time(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # alternated, so load changes hit every case alike
        for name, cmd in CASES.items():
            times[name].append(_time(cmd))
    base = statistics.median(times["python -c pass (baseline)"])
    rows = {name: {"median_s": round(statistics.median(t), 3), "max_s": round(max(t), 3),
                   "ratio_to_bare_python": round(statistics.median(t) / base, 2)} for name, t in times.items()}
    worst = max(v["median_s"] for k, v in rows.items() if k.startswith("difffeat"))
    result = {"repeats": args.repeats, "load_average": os.getloadavg(), "cases": rows,
              "slowest_difffeat_median_s": worst, "under_1_s": worst < 1.0}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
