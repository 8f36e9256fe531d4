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


#: one-pass runs whose predicted maps exceed this are skipped (the shared CPU machine's memory per job)
_MAX_MEASURED_MAPS_MB = 6 * 1024


def _sdxl_shaped_segmenter(resolution: int, passes: str, device: str = "cpu"):
    from ..backbones import load
    from ..segment import Segmenter
    from ..segment.settings import settings_for
    from ..testing import sdxl_shaped_pipeline

    settings = settings_for("sdxl", "sdxl").update(resolution=resolution, memory=passes)
    return Segmenter(load(sdxl_shaped_pipeline(), device=device), settings=settings)


def _prepared(seg, resolution: int):
    from ..segment.prompts import build_layout

    s = seg.settings
    layout = build_layout(["cat", "dog"], seg.backbone.text_segments(), s.template, list(s.background_entities), None)
    image = _image(resolution)
    return image, layout, seg.backbone.prepare([image], layout.caption, s.t, s.seed, resolution)


def goca_memory_child(passes: str, resolution: int, repeats: int) -> dict[str, float]:
    """In a fresh process: the peak RSS of a bare forward of the SDXL-shaped model, the growth of the peak
    over it while one GOCA segmentation in ``passes`` observes and decides, the maps the observation keeps
    (measured, and as :func:`~difffeat.segment.memory.maps_kept_mb` accounts them), and the observed forward's
    time against the bare forward's (alternated, medians)."""
    from ..segment.memory import maps_kept_mb
    from .bench_real import _peak_rss_mb, _reset_peak_rss

    seg = _sdxl_shaped_segmenter(resolution, passes)
    image, layout, inputs = _prepared(seg, resolution)
    s = seg.settings
    accounted = maps_kept_mb(seg.map_geometry(inputs), passes, s.pseudo_grid, s.ref_channels == "first")
    _reset_peak_rss()
    seg.backbone.denoise(inputs)
    base = _peak_rss_mb()
    _reset_peak_rss()
    obs = seg.observe_prepared([image], [layout], inputs)[0]
    after_observe = _peak_rss_mb()
    seg.decide(obs)
    after_decide = _peak_rss_mb()
    held = [*obs.activations.values()] + ([obs.refine_mean] if obs.refine_mean is not None else [])
    kept = sum(x.numel() * x.element_size() for x in held) / 2**20
    obs = None
    bare, observed = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        seg.backbone.denoise(inputs)
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        seg.observe_prepared([image], [layout], inputs)
        observed.append(time.perf_counter() - start)
    return {"bare_peak_mb": base, "observe_extra_peak_mb": max(0.0, after_observe - base),
            "segment_extra_peak_mb": max(0.0, after_decide - base), "kept_maps_mb": kept,
            "accounted_kept_maps_mb": accounted, "bare_forward_s": statistics.median(bare),
            "observe_s": statistics.median(observed)}


def goca_memory_benchmark(resolution: int = 1024, repeats: int = 1, device: str = "cpu", dtype: str | None = None) -> dict[str, Any]:
    """GOCA's map memory in one pass vs two (``SegmentSettings.memory``) on an SDXL-shaped small-channel UNet
    (:func:`difffeat.testing.sdxl_shaped_pipeline`: SDXL's grids and 70 transformer blocks, so SDXL's maps),
    under SDXL's GOCA settings: per mode, in a fresh subprocess, the extra peak RSS of a segmentation over a
    bare forward, the maps kept (measured and accounted) and the observed forward vs the bare forward's time.
    A one-pass run whose accounted maps exceed 6 GiB is skipped (reported with its accounting). CPU only."""
    import torch

    from ..segment.memory import maps_kept_mb

    if device != "cpu":
        raise ValueError("the goca-memory benchmark measures peak RSS on the CPU; use --device cpu")
    seg = _sdxl_shaped_segmenter(resolution, "auto")
    _, _, inputs = _prepared(seg, resolution)
    s = seg.settings
    geo = seg.map_geometry(inputs)
    modes: dict[str, Any] = {}
    for passes in ("one-pass", "two-pass"):
        accounted = maps_kept_mb(geo, passes, s.pseudo_grid, s.ref_channels == "first")
        if accounted > _MAX_MEASURED_MAPS_MB:
            modes[passes] = {"skipped": f"accounted maps {accounted / 1024:.2f} GiB exceed this machine's memory per job",
                             "accounted_kept_maps_mb": round(accounted, 1)}
            continue
        code = (f"import json; from difffeat.devtools.bench import goca_memory_child; "
                f"print('RESULT', json.dumps(goca_memory_child({passes!r}, {resolution}, {repeats})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"goca-memory subprocess failed ({passes}):\n{proc.stderr[-2000:]}")
        modes[passes] = {k: round(v, 3 if k.endswith("_s") else 1) for k, v in json.loads(line[len("RESULT "):]).items()}
        modes[passes]["observe_vs_bare_forward"] = round(modes[passes]["observe_s"] / modes[passes]["bare_forward_s"], 3)
    out = {
        "suite": "goca-memory", "arch": "sdxl-shaped", "resolution": resolution, "repeats": repeats, "device": "cpu",
        "dtype": "float32", "threads": torch.get_num_threads(),
        "command": f"difffeat bench goca-memory --resolution {resolution} --repeats {repeats}",
        "model": "SDXL-shaped small-channel UNet (70 transformer blocks, SDXL's grids), SDXL's GOCA settings",
        "auto_passes": seg.passes(inputs), "modes": modes,
    }
    if hasattr(os, "getloadavg"):
        out["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return out


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"goca": goca_benchmark, "goca-memory": goca_memory_benchmark}


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
