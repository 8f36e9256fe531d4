"""Observer attention kernel: the observer's path vs the fused SDPA kernel, before vs after a change, in one run.

    python benchmarks/observer_kernel.py [--before fea6cc1] [--rounds 2] [--reps 3] [--threads 1 2]
                                         [--attention self cross two-pass] [--conditions quiet loaded]
                                         [--out benchmarks/results/observer_kernel.json]

SD1.5-sized attention at 512 px (float32, random tensors): self-attention 4096 x 4096 tokens reduced by
``head_mean`` and cross-attention 4096 x 77 tokens reduced by GOCA's head-weighted reducer, 8 heads x 40 dims,
batch 1, the layer output filled (as a captured forward does). ``two-pass`` (not run by default): the same
self-attention reduced by the second pass's :class:`~difffeat.segment.layerscores.LayerScoreStream` reducer of a
map that is both a layer-weight and a refinement map (SD1.5's ``down_blocks.0``: a 64x64 map scored against
``P`` on the 32x32 reference grid, published settings, and summed for refinement), with ``head_mean``'s observer
call (the one-pass self-map reduction's kernel work) timed beside it as ``observer_head_mean``. Each measurement
times, interleaved in one process:

- ``fused``: ``F.scaled_dot_product_attention`` (what an unobserved layer's attention costs);
- ``fused_proj``: the same plus the layer's output projection ``[4096, 320] x [320, 320]`` (GOCA's head weights
  need one product of that size per layer, so this is the floor of an observed GOCA cross layer);
- ``observer``: :func:`difffeat.capture.attention_probs` as ``Segmenter`` calls it;
- ``explicit``: the least any explicit path does, in plain torch in the caller's thread: per chunk of 2**20
  logits (all heads; 32 query rows of self-attention) one ``q.k^T`` product, softmax in place, one ``P V``
  product into the output; no reduction (the floor of an observer that forms the maps with torch's kernels).

"before" is the difffeat package of the ``--before`` commit (``git archive``), "after" this checkout's; each runs
in its own process (one per condition and round, alternating which goes first), and every ratio is against the
``fused`` time of the same process. Conditions: 1 and 2 torch threads, alone ("quiet") and beside one
busy-looping Python process that this script starts ("loaded"). Ratios are medians over ``--reps`` interleaved
repetitions, then the median over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS, DIM, TOKENS, TEXT = 8, 40, 4096, 77
THREADS = (1, 2)
KINDS = ("self", "cross", "two-pass")
CONDITIONS = ("quiet", "loaded")


def _child(src: Path, reps: int, threads_list: list[int], kinds: list[str]) -> dict:
    """Times of every (threads, kind) for the difffeat package under ``src`` (run in a fresh process)."""
    sys.path.insert(0, str(src))
    import torch
    import torch.nn.functional as F

    import difffeat
    from difffeat.capture import AttentionTensors, attention_probs, head_mean
    from difffeat.segment.aggregation import GocaHeadReducer

    assert Path(difffeat.__file__).resolve().is_relative_to(src.resolve()), difffeat.__file__

    def case(kind: str) -> dict:
        g = torch.Generator().manual_seed(0)
        nk = TEXT if kind == "cross" else TOKENS
        q = torch.randn(1, HEADS, TOKENS, DIM, generator=g)
        k = torch.randn(1, HEADS, nk, DIM, generator=g)
        v = torch.randn(1, HEADS, nk, DIM, generator=g)
        attn = torch.nn.Module()
        attn.to_out = torch.nn.ModuleList([torch.nn.Linear(HEADS * DIM, HEADS * DIM)])
        image, text = (None, slice(0, nk)) if kind == "cross" else (slice(0, nk), None)
        tensors = AttentionTensors(q, k, v, None, DIM**-0.5, image_keys=image, text_keys=text)
        reducer = {"self": head_mean, "cross": GocaHeadReducer()}.get(kind)
        if kind == "two-pass":  # SD1.5's reference feature (up_blocks.2, 320 channels at 32x32), first channel
            from difffeat.segment.layerscores import LayerScoreStream

            grid = (64, 64)
            stream = LayerScoreStream(torch.randn(1, 320, 32, 32, generator=g), {"s": grid}, {"s": grid}, grid,
                                      first_channel=True, mass_preserving=False)
            reducer = stream.reducers()["s"]
        out = q.new_empty(1, TOKENS, HEADS, DIM).transpose(1, 2)  # laid out as torch's CPU SDPA returns it

        def fused_proj():
            o = F.scaled_dot_product_attention(q, k, v)
            return attn.to_out[0](o.transpose(1, 2).reshape(1, TOKENS, HEADS * DIM))

        qs, kt = q * DIM**-0.5, k.transpose(-1, -2).contiguous()

        step = 2**20 // (HEADS * nk)

        def explicit():
            for start in range(0, TOKENS, step):
                rows = slice(start, start + step)
                p = torch.softmax(torch.matmul(qs[:, :, rows], kt), dim=-1)
                torch.matmul(p, v, out=out[:, :, rows])

        keys = "cross" if kind == "cross" else "self"
        fns = {
            "fused": lambda: F.scaled_dot_product_attention(q, k, v),
            "fused_proj": fused_proj,
            "observer": lambda: attention_probs(tensors, keys, reducer, attn, output_bhqd=out),
            "explicit": explicit,
        }
        if kind == "two-pass":
            fns["observer_head_mean"] = lambda: attention_probs(tensors, keys, head_mean, attn, output_bhqd=out)
        return fns

    rows = []
    with torch.no_grad():
        for threads in threads_list:
            torch.set_num_threads(threads)
            for kind in kinds:
                fns = case(kind)
                inner = 10 if kind == "cross" else 1
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
                rows.append({"threads": threads, "attention": kind, "seconds": med,
                             "observer_over_fused": med["observer"] / med["fused"],
                             "observer_over_fused_proj": med["observer"] / med["fused_proj"],
                             "explicit_over_fused": med["explicit"] / med["fused"],
                             **({"observer_over_head_mean": med["observer"] / med["observer_head_mean"]}
                                if "observer_head_mean" in med else {})})
    return {"torch": torch.__version__, "rows": rows}


def _export(ref: str, into: Path) -> Path:
    """The difffeat package of commit ``ref``, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "difffeat"], check=True, capture_output=True).stdout
    path = into / "before.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_child(src: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, __file__, "--child", str(src), "--reps", str(args.reps),
                           "--threads", *map(str, args.threads), "--attention", *args.attention], env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="fea6cc1", help="git commit whose difffeat is 'before'")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "observer_kernel.json")
    parser.add_argument("--threads", type=int, nargs="+", default=list(THREADS), help="torch thread counts")
    parser.add_argument("--attention", nargs="+", choices=KINDS, default=["self", "cross"])
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.reps, args.threads, args.attention)))
        return
    results: dict[tuple, dict[str, list[dict]]] = {}
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": _export(args.before, Path(tmp)), "after": ROOT}
        for condition in args.conditions:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "loaded" else None
            try:
                for rnd in range(args.rounds):
                    for which in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                        child = _run_child(trees[which], args)
                        for row in child["rows"]:
                            key = (condition, row["threads"], row["attention"])
                            results.setdefault(key, {"before": [], "after": []})[which].append(row)
                            print(json.dumps({"condition": condition, "round": rnd, "tree": which, "threads": row["threads"],
                                              "attention": row["attention"],
                                              "observer_over_fused": round(row["observer_over_fused"], 3),
                                              "explicit_over_fused": round(row["explicit_over_fused"], 3),
                                              **({"observer_over_head_mean": round(row["observer_over_head_mean"], 3)}
                                                 if "observer_over_head_mean" in row else {}),
                                              "fused_s": round(row["seconds"]["fused"], 4)}), flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            load[condition] = os.getloadavg()
    rows = []
    for (condition, threads, kind), by_tree in results.items():
        row = {"condition": condition, "threads": threads, "attention": kind}
        for which, measured in by_tree.items():
            row[which] = {
                "observer_over_fused": statistics.median(m["observer_over_fused"] for m in measured),
                "observer_over_fused_proj": statistics.median(m["observer_over_fused_proj"] for m in measured),
                "explicit_over_fused": statistics.median(m["explicit_over_fused"] for m in measured),
                "seconds": [m["seconds"] for m in measured],
            }
            if "observer_over_head_mean" in measured[0]:
                row[which]["observer_over_head_mean"] = statistics.median(m["observer_over_head_mean"] for m in measured)
        rows.append(row)
    result = {
        "command": "python benchmarks/observer_kernel.py " + " ".join(sys.argv[1:]),
        "before": args.before,
        "after": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "shape": {"heads": HEADS, "dim": DIM, "tokens": TOKENS, "text": TEXT, "batch": 1},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)
    for row in rows:
        print(row["condition"], row["threads"], row["attention"],
              "before %.2fx after %.2fx (vs fused+proj: %.2fx / %.2fx; plain explicit %.2fx)" % (
                  row["before"]["observer_over_fused"], row["after"]["observer_over_fused"],
                  row["before"]["observer_over_fused_proj"], row["after"]["observer_over_fused_proj"],
                  row["after"]["explicit_over_fused"]),
              *(["observer over head_mean's: before %.2fx after %.2fx" % (row["before"]["observer_over_head_mean"],
                                                                     row["after"]["observer_over_head_mean"])]
                if "observer_over_head_mean" in row["after"] else []))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
