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

__all__ = ["BENCHMARKS", "goca_benchmark"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _image(resolution: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))


def _memory_child(mode: str, resolution: int) -> dict[str, float]:
    """Run in a subprocess: bare forward, then one capture in ``mode``; report peak-RSS growth."""
    import torch

    from . import Capture, Segmenter, load
    from .capture import head_mean, per_head
    from .segment.aggregation import GocaHeadReducer
    from .testing import sd15_shaped_pipeline

    torch.set_num_threads(1)
    seg = Segmenter(load(sd15_shaped_pipeline(), device="cpu"), resolution=resolution)
    backbone = seg.backbone
    layout_caption = "a photo of cat, dog, background"
    inputs = backbone.prepare([_image(resolution)], layout_caption, seg.settings.t, 0, resolution)
    backbone.denoise(inputs)
    base = _peak_rss_mb()
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
    return {"extra_peak_mb": _peak_rss_mb() - base, "kept_mb": kept}


def _run_child(mode: str, resolution: int) -> dict[str, float]:
    code = f"import json; from difffeat.bench import _memory_child; print('RESULT', json.dumps(_memory_child({mode!r}, {resolution})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark subprocess failed ({mode}):\n{proc.stderr[-2000:]}")


def goca_benchmark(resolution: int = 512, repeats: int = 3) -> dict[str, Any]:
    """Observer memory ratio and segment/forward time ratio (see module docstring)."""
    import torch

    from . import Segmenter, load
    from .testing import sd15_shaped_pipeline

    mem = {mode: _run_child(mode, resolution) for mode in ("reference", "observer")}
    seg = Segmenter(load(sd15_shaped_pipeline(), device="cpu"), resolution=resolution)
    image = _image(resolution)
    inputs = seg.backbone.prepare([image], "a photo of cat, dog, background", seg.settings.t, 0, resolution)
    seg(image, ["cat", "dog"])  # warm-up
    bare, full = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        seg.backbone.denoise(inputs)
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        seg(image, ["cat", "dog"])
        full.append(time.perf_counter() - start)
    return {
        "model": "SD1.5-shaped small-channel UNet (16 cross-attention layers, 8 heads)",
        "resolution": resolution,
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
