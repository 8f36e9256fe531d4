"""Observer attention kernel: the fused SDPA kernel vs the observer's explicit path vs its fused-lse path.

    python benchmarks/observer_kernel.py [--reps 3] [--out benchmarks/results/observer_kernel.json]

SD1.5-sized attention at 512 px (float32, random tensors): self-attention 4096 x 4096 tokens and cross-attention
4096 x 77 tokens, 8 heads x 40 dims, batch 1. Each row times, in the same run and interleaved:

- ``fused``: ``F.scaled_dot_product_attention`` (what an unobserved layer costs);
- ``explicit``: :func:`difffeat.capture.attention_probs` with ``fused_lse=False`` (softmax(QK^T) chunk by chunk,
  output ``P @ V`` from the same chunks);
- ``lse``: the same call with ``fused_lse=True`` (output and log-sum-exp from torch's CPU flash kernel, maps
  ``exp(QK^T - lse)``).

The observer fills the layer output in both paths (as a captured forward does); the self maps are reduced by
``head_mean`` and the cross maps by GOCA's head-weighted reducer, as GOCA observes them. Ratios are medians
over ``--reps`` interleaved repetitions, at 1 and 2 torch threads, alone ("quiet") and beside one busy-looping
Python process ("loaded").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from difffeat.capture import AttentionTensors, attention_probs, head_mean  # noqa: E402
from difffeat.segment.aggregation import GocaHeadReducer  # noqa: E402

HEADS, DIM, TOKENS, TEXT = 8, 40, 4096, 77


def _busy() -> None:
    while True:
        pass


def _case(kind: str):
    g = torch.Generator().manual_seed(0)
    nk = TOKENS if kind == "self" else TEXT
    q = torch.randn(1, HEADS, TOKENS, DIM, generator=g)
    k = torch.randn(1, HEADS, nk, DIM, generator=g)
    v = torch.randn(1, HEADS, nk, DIM, generator=g)
    attn = torch.nn.Module()
    attn.to_out = torch.nn.ModuleList([torch.nn.Linear(HEADS * DIM, HEADS * DIM)])
    image, text = (slice(0, nk), None) if kind == "self" else (None, slice(0, nk))
    tensors = AttentionTensors(q, k, v, None, DIM**-0.5, image_keys=image, text_keys=text)
    reducer = head_mean if kind == "self" else GocaHeadReducer()
    out = q.new_empty(1, TOKENS, HEADS, DIM).transpose(1, 2)  # the layer output, laid out as torch's CPU SDPA returns it
    return {
        "fused": lambda: F.scaled_dot_product_attention(q, k, v),
        "explicit": lambda: attention_probs(tensors, kind, reducer, attn, output_bhqd=out, fused_lse=False),
        "lse": lambda: attention_probs(tensors, kind, reducer, attn, output_bhqd=out, fused_lse=True),
    }


def _measure(kind: str, reps: int) -> dict:
    fns = _case(kind)
    inner = 1 if kind == "self" else 20
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "seconds": med,
        "explicit_over_fused": med["explicit"] / med["fused"],
        "lse_over_fused": med["lse"] / med["fused"],
        "lse_over_explicit": med["lse"] / med["explicit"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "observer_kernel.json")
    args = parser.parse_args()
    rows = []
    for condition in ("quiet", "loaded"):
        busy = mp.Process(target=_busy, daemon=True) if condition == "loaded" else None
        if busy is not None:
            busy.start()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for kind in ("self", "cross"):
                    row = {"condition": condition, "threads": threads, "attention": kind, **_measure(kind, args.reps)}
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "seconds"}), flush=True)
                    rows.append(row)
        finally:
            if busy is not None:
                busy.terminate()
                busy.join()
    result = {
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "shape": {"heads": HEADS, "dim": DIM, "tokens": TOKENS, "text": TEXT, "batch": 1},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
