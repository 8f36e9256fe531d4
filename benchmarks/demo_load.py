"""Load test of the Gradio demo: N concurrent ``/segment`` requests through ``gradio_client``.

Usage::

    python benchmarks/demo_load.py                       # starts the demo itself (shapes, or the random fallback)
    python benchmarks/demo_load.py --model /tmp/tiny-sd --requests 20 --concurrency 2
    python benchmarks/demo_load.py --url http://127.0.0.1:7860/   # an already running demo

Writes ``benchmarks/results/demo_load.json``: p50/p95/max latency (s, submit -> result, so queue wait
included), wall time, throughput, failures, the machine's load average before and after, and (self-started
demo only) the peak number of handlers running at once, which must not exceed the queue's concurrency limit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from difffeat.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "demo_load.json"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def segment_args(image: str, classes: str, model: str, fast: bool = False) -> tuple:
    """Positional inputs of the ``/segment`` endpoint; ``fast`` = the vanilla switches (cheaper)."""
    from gradio_client import handle_file

    switches = ("mean", "uniform", "none") if fast else ("goca", "goca", "goca")
    return (handle_file(image), classes, model, None, *switches, None)


def run_load(url: str, args: tuple, requests: int = 20, threads: int | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """Fire ``requests`` ``/segment`` calls at once (one client per thread, results not downloaded);
    latencies and failures."""
    from gradio_client import Client

    local = threading.local()

    def one(_: int) -> tuple[float, str | None]:
        if not hasattr(local, "client"):  # generous timeouts: under load a request waits in the queue
            local.client = Client(url, verbose=False, download_files=False, httpx_kwargs={"timeout": timeout})
        t0 = time.perf_counter()
        try:
            local.client.predict(*args, api_name="/segment")
            return time.perf_counter() - t0, None
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads or requests) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok = [lat for lat, err in results if err is None]
    return {
        "requests": requests,
        "succeeded": len(ok),
        "errors": [err for _, err in results if err is not None],
        "p50_s": round(percentile(ok, 50), 3),
        "p95_s": round(percentile(ok, 95), 3),
        "max_s": round(max(ok), 3) if ok else None,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(ok) / wall, 4) if wall else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running demo (default: start one here)")
    p.add_argument("--model", default="shapes", help="model of the self-started demo (falls back to random weights)")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=2, help="queue concurrency limit of the self-started demo")
    p.add_argument("--image", default=None, help="default: the first bundled example")
    p.add_argument("--classes", default=None, help="default: the example's classes")
    p.add_argument("--fast", action="store_true", help="vanilla switches (cheaper forwards)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    from difffeat.demo import bundled_examples, launch

    image, classes = bundled_examples()[0]
    image, classes = a.image or image, a.classes or classes
    demo = None
    url = a.url
    if url is None:
        demo = launch(a.model, port=free_port(), concurrency=a.concurrency, block=False, preload=True)
        url = demo.local_url
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    try:
        report = run_load(url, segment_args(image, classes, a.model, a.fast), a.requests)
    finally:
        if demo is not None:
            demo.close()
    report.update(url=url if a.url else None, model=a.model, classes=classes, fast=a.fast,
                  concurrency_limit=a.concurrency if demo else None,
                  peak_in_flight=demo.difffeat_meter.peak if demo else None,
                  fallback=bool(demo and demo.difffeat_cache.get(a.model).is_fallback),
                  load_average_before=[round(x, 2) for x in load_before],
                  load_average_after=[round(x, 2) for x in os.getloadavg()], cpu_count=os.cpu_count(),
                  time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
