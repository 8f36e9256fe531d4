"""Benchmarks, reported as ratios against a baseline measured in the same run (never as timed tests).

``goca``: on an SD1.5-shaped small-channel model (:func:`difffeat.testing.sd15_shaped_pipeline`, SD1.5's
block structure and 16 cross-attention layers with 8 heads):

* memory — extra peak memory of one segmentation forward with difffeat's attention observer (heads
  aggregated inside the attention computation, chunk by chunk; head-mean self maps) vs. the reference
  approach (store every head's cross- and self-attention map of every layer, aggregate afterwards).
  Each mode runs in a fresh subprocess; the figure is the growth of the process's peak RSS over a bare
  forward measured in that same process.
* time — ``Segmenter.__call__`` (prepare + forward with observers + aggregation) vs. a bare denoiser
  forward on the same prepared input (median of ``repeats``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["run_benchmark"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _image(resolution: int):
    from .bench_real import benchmark_image

    return benchmark_image(resolution)


def _cuda_peak_mb(device: str) -> float:
    import torch

    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _memory_child(mode: str, resolution: int, device: str = "cpu", dtype: str | None = None) -> dict[str, float]:
    """Bare forward, then one capture in ``mode``; report the growth of the peak memory over the bare forward.

    On the CPU this runs in a fresh subprocess and reads the process's peak RSS; on CUDA it reads the
    allocator's peak (``torch.cuda.max_memory_allocated``), which is exact and per device, so it runs in-process.
    """
    import torch

    from ..backbones import load
    from ..capture import Capture
    from ..segment import Segmenter
    from ..capture import head_mean, per_head
    from ..segment.aggregation import GocaHeadReducer
    from ..testing import sd15_shaped_pipeline

    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)
    seg = Segmenter(load(sd15_shaped_pipeline(), device=device, dtype=dtype), resolution=resolution)
    backbone = seg.backbone
    layout_caption = "a photo of cat, dog, background"
    inputs = backbone.prepare([_image(resolution)], layout_caption, seg.settings.t, 0, resolution)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    backbone.denoise(inputs)
    base = _cuda_peak_mb(device) if cuda else _peak_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if mode == "observer":
        names = seg.activation_names()
        reducers = {n: GocaHeadReducer() for n in seg.cross_names}
        with Capture(backbone, names, inputs, early_exit=True, map_reducer=head_mean, map_reducers=reducers) as cap:
            backbone.denoise(inputs)
    else:  # reference: every head's cross and self map of every layer, kept until aggregation
        names = list(dict.fromkeys(seg.cross_names + seg.self_names + [seg.ref_name]))
        with Capture(backbone, names, inputs, early_exit=False, map_reducer=per_head) as cap:
            backbone.denoise(inputs)
    kept = sum(t.numel() * t.element_size() for t in cap.activations.values()) / 2**20
    peak = _cuda_peak_mb(device) if cuda else _peak_rss_mb()
    return {"extra_peak_mb": peak - base, "kept_mb": kept}


def _run_child(mode: str, resolution: int, dtype: str | None = None) -> dict[str, float]:
    code = (f"import json; from difffeat.devtools.bench import _memory_child; "
            f"print('RESULT', json.dumps(_memory_child({mode!r}, {resolution}, 'cpu', {dtype!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark subprocess failed ({mode}):\n{proc.stderr[-2000:]}")


def goca_benchmark(resolution: int = 512, repeats: int = 3, device: str = "cpu", dtype: str | None = None) -> dict[str, Any]:
    """Observer memory ratio and segment/forward time ratio (see module docstring).

    ``device="cuda"`` measures GPU memory (allocator peak) and GPU time (synchronised); ``dtype`` as in
    :func:`difffeat.load` (default fp16 on CUDA, fp32 on the CPU).
    """
    import torch

    from ..backbones import load
    from ..segment import Segmenter
    from ..testing import sd15_shaped_pipeline

    from ..checks import check_device

    check_device(device)
    cuda = device.startswith("cuda")
    if device != "cpu" and not cuda:
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')")
    if cuda:
        mem = {mode: _memory_child(mode, resolution, device, dtype) for mode in ("reference", "observer")}
    else:
        mem = {mode: _run_child(mode, resolution, dtype) for mode in ("reference", "observer")}
    backbone = load(sd15_shaped_pipeline(), device=device, dtype=dtype)
    seg = Segmenter(backbone, resolution=resolution)
    image = _image(resolution)
    inputs = seg.backbone.prepare([image], "a photo of cat, dog, background", seg.settings.t, 0, resolution)
    seg(image, ["cat", "dog"])  # warm-up

    def timed(fn: Callable[[], Any]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    bare, full = [], []
    for _ in range(repeats):
        bare.append(timed(lambda: seg.backbone.denoise(inputs)))
        full.append(timed(lambda: seg(image, ["cat", "dog"])))
    return {
        "model": "SD1.5-shaped small-channel UNet (16 cross-attention layers, 8 heads)",
        "resolution": resolution,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(backbone.dtype).replace("torch.", ""),
        "memory_measure": "CUDA allocator peak" if cuda else "process peak RSS (fresh subprocess per mode)",
        "threads": torch.get_num_threads(),
        "memory_reference_extra_peak_mb": round(mem["reference"]["extra_peak_mb"], 1),
        "memory_observer_extra_peak_mb": round(mem["observer"]["extra_peak_mb"], 1),
        "memory_ratio_observer_vs_reference": round(mem["observer"]["extra_peak_mb"] / max(mem["reference"]["extra_peak_mb"], 1e-9), 3),
        "kept_maps_reference_mb": round(mem["reference"]["kept_mb"], 1),
        "kept_maps_observer_mb": round(mem["observer"]["kept_mb"], 1),
        "bare_forward_s": round(statistics.median(bare), 3),
        "segment_s": round(statistics.median(full), 3),
        "time_ratio_segment_vs_bare_forward": round(statistics.median(full) / statistics.median(bare), 2),
    }


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"goca": goca_benchmark}


def run_benchmark(what: str = "goca", resolution: int = 512, repeats: int = 3, device: str = "cpu",
                  dtype: str | None = None, out_file: str | None = None, arch: str = "tiny",
                  text_layers: int | None = None) -> dict[str, Any]:
    """``difffeat bench``: run one benchmark after checking its options; the figures are also written to
    ``out_file`` (JSON) when given. ``arch="tiny"``: :data:`BENCHMARKS` on the quick SD1.5-shaped model; a
    real-size architecture name (``sd15``, ``sdxl`` ...): a suite of :mod:`difffeat.devtools.bench_real`."""
    from ..checks import check_device, check_number, check_out_file, check_resolution
    from ..errors import InvalidOptionError
    from ..io import write_json

    if arch == "tiny" and what not in BENCHMARKS:
        raise InvalidOptionError(f"unknown benchmark {what!r}; choose one of {', '.join(BENCHMARKS)}")
    check_resolution("--resolution", resolution)
    check_number("--repeats", repeats, 1, 1000, integer=True)
    check_out_file(out_file, "--out file")
    check_device(device)
    if arch == "tiny":
        figures = BENCHMARKS[what](resolution=resolution, repeats=repeats, device=device, dtype=dtype)
    else:
        from .bench_real import real_benchmark

        figures = real_benchmark(what, arch, resolution=resolution, repeats=repeats, device=device, dtype=dtype,
                                 text_layers=text_layers)
    if out_file:
        write_json(out_file, figures)
    return figures
