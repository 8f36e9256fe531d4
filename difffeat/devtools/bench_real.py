"""Benchmarks on real-size architectures with random weights (``difffeat bench SUITE --arch sd15``).

The pipeline comes from :mod:`difffeat.architectures` (the published component configs, random weights,
offline). Every figure is a ratio against a baseline measured in the same process and run: timings
alternate (bare forward, then each measured step, per repeat) and the median of ``repeats`` is reported.
Times are wall-clock seconds; on a shared machine the ratios are what counts.

Suites:

* ``goca`` — the time split of one GOCA segmentation (prepare = VAE + text encoder + noise; the observed
  forward, and the same in two passes, ``memory="two-pass"``; decide), against the bare denoiser forward and
  against prepare + bare forward; the kept maps
  vs what storing every head's map would keep (sizes from the captured shapes); the extra peak memory of
  a segmentation over a bare forward, in a fresh subprocess (peak RSS on the CPU, allocator peak on CUDA).
* ``features`` — every feature preset of the architecture: its extraction (the capture forward with and without early exit,
  and end to end) against one bare forward.
* ``early-exit`` — a forward stopped after each UNet up level's output (``up_blocks.L``) vs the whole forward.
* ``throughput`` — images/s of batched segmentation (``Segmenter.segment``) at batch 1, 4 and 8.
* ``accounting`` — the maps a segmentation keeps at any resolution, in one pass and in two
  (``SegmentSettings.memory``), and the two-pass observation's first pass in FLOPs of a bare forward, from
  the meta-device denoiser (no real compute).
* ``vae`` — the VAE encode in bf16 (and fp16 on CUDA) vs fp32: time ratio and the relative error of the
  latents and of the preset's features.
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

from ..errors import InvalidOptionError

__all__ = ["goca_real", "features_real", "early_exit_real", "vae_real", "throughput_real"]

_CAPTION_CLASSES = ["cat", "dog"]
_DEFAULT_PRESET = {"sd15": "sd15-practical", "sd21": "sd21-practical", "sdxl": "sdxl-practical",
                   "pixart": "pixart-practical", "sd3": "sd3-practical", "flux": "flux-practical",
                   "sd35-medium": "sd3-practical", "sana-1600m": "sana-practical",
                   "lumina-image-2": "lumina2-practical"}  # fmt: skip


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _backbone(arch: str, device: str, dtype: str | None, text_layers: int | None):
    import torch

    from ..backbones import load
    from ..architectures import build_pipeline

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}
    if dtype not in dtypes:
        raise InvalidOptionError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    torch_dtype = dtypes[dtype] or (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = build_pipeline(arch, dtype=torch_dtype, text_layers=text_layers)
    return load(pipe, device=device, dtype=torch_dtype)


def benchmark_image(resolution: int):
    """The benchmarks' input: a fixed random RGB image of ``resolution`` px square."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))


_image = benchmark_image


def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    import torch

    def timed(fn: Callable[[], Any]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def _environment(device: str, backbone) -> dict[str, Any]:
    import torch

    env = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
           "dtype": str(backbone.dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        env["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return env


# ------------------------------------------------------------------------------------------------ goca
def _observe_forward(seg, image, layout, inputs):
    """The observed forward alone on prepared inputs (what ``Segmenter.observe`` runs after prepare)."""
    return seg.observe_prepared([image], [layout], inputs)[0]


def _kept_mb(obs) -> float:
    """The maps and features one observation keeps (MiB)."""
    kept = [*obs.activations.values()] + ([obs.refine_mean] if obs.refine_mean is not None else [])
    return sum(x.numel() * x.element_size() for x in kept) / 2**20


def _reference_kept_mb(seg, obs) -> float:
    """What storing every head's cross and self map of every layer keeps (the reference approach), from the
    captured cross-map shapes and each layer's head count."""
    den = seg.backbone.denoiser
    total = 0
    for cross, self_name in zip(seg.cross_names, seg.self_names):
        heads = den.get_submodule(self_name.rsplit(".", 1)[0]).heads
        b, hw, text = obs.activations[cross].shape
        total += heads * b * hw * (text + hw) * 4
    return total / 2**20


def _reset_peak_rss() -> None:
    """Reset the process's peak RSS (Linux: ``VmHWM`` via ``/proc/self/clear_refs``); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """Peak RSS since the last reset (``VmHWM``), else since the start (``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_child(arch: str, resolution: int, device: str, dtype: str | None, text_layers: int | None) -> dict[str, float]:
    """In a fresh process: peak memory of a bare forward, then the growth of the peak over it during one
    GOCA segmentation of the same prepared image (observe + decide)."""
    import torch

    from ..segment import Segmenter
    cuda = device.startswith("cuda")
    seg = Segmenter(_backbone(arch, device, dtype, text_layers), resolution=resolution)
    image = _image(resolution)
    from ..segment.prompts import build_layout

    layout = build_layout(_CAPTION_CLASSES, seg.backbone.text_segments(), seg.settings.template,
                          list(seg.settings.background_entities), None)
    inputs = seg.backbone.prepare([image], layout.caption, seg.settings.t, seg.settings.seed, resolution)
    peak = (lambda: torch.cuda.max_memory_allocated(device) / 2**20) if cuda else _peak_rss_mb
    reset = (lambda: torch.cuda.reset_peak_memory_stats(device)) if cuda else _reset_peak_rss
    if cuda:
        torch.cuda.synchronize(device)
    reset()  # the peak of building the model is not the forward's
    seg.backbone.denoise(inputs)
    base = peak()
    reset()
    obs = _observe_forward(seg, image, layout, inputs)
    after_observe = peak()
    seg.decide(obs)
    after_decide = peak()
    return {"bare_peak_mb": base, "observe_extra_peak_mb": max(0.0, after_observe - base),
            "segment_extra_peak_mb": max(0.0, after_decide - base)}


def _memory_in_subprocess(arch: str, resolution: int, dtype: str | None, text_layers: int | None) -> dict[str, float]:
    code = (f"import json; from difffeat.devtools.bench_real import memory_child; "
            f"print('RESULT', json.dumps(memory_child({arch!r}, {resolution}, 'cpu', {dtype!r}, {text_layers!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"memory subprocess failed:\n{proc.stderr[-2000:]}")


def goca_real(arch: str, resolution: int, repeats: int = 3, device: str = "cpu", dtype: str | None = None,
              text_layers: int | None = None, memory: bool = True) -> dict[str, Any]:
    """See the module docstring (suite ``goca``)."""
    import torch

    from ..segment import Segmenter
    from ..segment.prompts import build_layout

    mem = None
    if memory:  # first, so that the subprocess and this process never hold a model at the same time
        _progress(f"{arch} {resolution}px: peak memory in a fresh process")
        if device.startswith("cuda"):  # the allocator's peak is per process and exact: measured here
            import gc

            mem = memory_child(arch, resolution, device, dtype, text_layers)
            gc.collect()
            torch.cuda.empty_cache()
        else:
            mem = _memory_in_subprocess(arch, resolution, dtype, text_layers)
    _progress(f"{arch}: building the real-size pipeline (random weights)")
    seg = Segmenter(_backbone(arch, device, dtype, text_layers), resolution=resolution)
    backbone, s = seg.backbone, seg.settings
    two_pass = Segmenter(backbone, settings=s.update(memory="two-pass"))
    image = _image(resolution)
    layout = build_layout(_CAPTION_CLASSES, backbone.text_segments(), s.template, list(s.background_entities), None)
    prepare = lambda: backbone.prepare([image], layout.caption, s.t, s.seed, resolution)  # noqa: E731
    inputs = prepare()
    timed = _timer(device)
    with torch.no_grad():
        backbone.denoise(inputs)
        obs = _observe_forward(seg, image, layout, inputs)  # warm-up
    t = {k: [] for k in ("bare", "prepare", "observed", "observed_two_pass", "decide", "end_to_end")}
    for i in range(repeats):
        _progress(f"{arch} {resolution}px: repeat {i + 1}/{repeats}")
        t["bare"].append(timed(lambda: backbone.denoise(inputs)))
        t["prepare"].append(timed(prepare))
        obs = None  # the previous observation's maps are not held during the next forward
        held = []
        t["observed"].append(timed(lambda: held.append(_observe_forward(seg, image, layout, inputs))))
        obs = held.pop()
        t["observed_two_pass"].append(timed(lambda: _observe_forward(two_pass, image, layout, inputs)))
        t["decide"].append(timed(lambda: seg.decide(obs)))
        t["end_to_end"].append(timed(lambda: seg(image, _CAPTION_CLASSES)))
    med = {k: statistics.median(v) for k, v in t.items()}
    floor = med["prepare"] + med["bare"]
    kept = _kept_mb(obs)
    out = {
        "suite": "goca", "arch": arch, "resolution": resolution, "repeats": repeats, **_environment(device, backbone),
        "seconds": {k: _median(v) for k, v in t.items()},
        "vs_bare_forward": {k: round(med[k] / med["bare"], 3) for k in ("prepare", "observed", "observed_two_pass", "decide", "end_to_end")},
        "auto_passes": seg.passes(inputs),
        "end_to_end_vs_prepare_plus_bare": round(med["end_to_end"] / floor, 3),
        "kept_maps_mb": round(kept, 1),
        "kept_maps_every_head_mb": round(_reference_kept_mb(seg, obs), 1),
    }
    if mem is not None:
        out["memory_mb"] = {k: round(v, 1) for k, v in mem.items()}
        out["memory_measure"] = "CUDA allocator peak" if device.startswith("cuda") else "peak RSS, fresh subprocess"
    return out


# ------------------------------------------------------------------------------------------------ features
def _capture_forward(backbone, names: list[str], inputs, early: bool):
    """One denoiser forward capturing ``names`` (stopping after the last of them when ``early``)."""
    from ..capture import Capture

    with Capture(backbone, names, inputs, early_exit=early) as cap:
        backbone.denoise(inputs)
    return cap


def features_real(arch: str, resolution: int, repeats: int = 3, device: str = "cpu", dtype: str | None = None,
                  text_layers: int | None = None, preset: str | None = None) -> dict[str, Any]:
    """See the module docstring (suite ``features``): every preset made for the architecture (named
    ``<arch>-*``, or ``preset``), each timed against the same bare forward, alternated per repeat."""
    from ..features import FeatureExtractor
    from ..presets import load_preset, presets_for

    _progress(f"{arch}: building the real-size pipeline (random weights)")
    backbone = _backbone(arch, device, dtype, text_layers)
    own = [p for p in presets_for(backbone) if p.startswith(arch + "-")]  # the arch's presets (sd15-practical, sd15-legacy)
    presets = [preset] if preset else own or [_DEFAULT_PRESET[arch]]
    image = _image(resolution)
    inputs = backbone.prepare([image], "", 50, 0, resolution)
    timed = _timer(device)
    names = {p: list(load_preset(p).features) for p in presets}
    extractors = {p: FeatureExtractor(backbone, preset=p, resolution=resolution) for p in presets}
    for p in presets:  # warm-up
        _capture_forward(backbone, names[p], inputs, True), _capture_forward(backbone, names[p], inputs, False)
    t: dict[str, list[float]] = {"bare": [], "prepare": []}
    for i in range(repeats):
        _progress(f"{arch} features: repeat {i + 1}/{repeats} ({', '.join(presets)})")
        t["bare"].append(timed(lambda: backbone.denoise(inputs)))
        for p in presets:
            t.setdefault(f"{p}:forward_full", []).append(timed(lambda: _capture_forward(backbone, names[p], inputs, False)))
            t.setdefault(f"{p}:forward_early_exit", []).append(timed(lambda: _capture_forward(backbone, names[p], inputs, True)))
            t.setdefault(f"{p}:end_to_end", []).append(timed(lambda: extractors[p](image)))
        t["prepare"].append(timed(lambda: backbone.prepare([image], "", 50, 0, resolution)))
    med = {k: statistics.median(v) for k, v in t.items()}
    per_preset = {}
    for p in presets:
        mine = {k.split(":", 1)[1]: med[k] for k in med if k.startswith(p + ":")}
        per_preset[p] = {
            "seconds": {k: round(v, 3) for k, v in mine.items()},
            "vs_bare_forward": {k: round(v / med["bare"], 3) for k, v in mine.items()},
            "end_to_end_vs_prepare_plus_bare": round(mine["end_to_end"] / (med["prepare"] + med["bare"]), 3),
            "early_exit_after": names[p][-1],
        }
    return {
        "suite": "features", "arch": arch, "resolution": resolution, "repeats": repeats, **_environment(device, backbone),
        "seconds": {"bare": _median(t["bare"]), "prepare": _median(t["prepare"])},
        "prepare_vs_bare_forward": round(med["prepare"] / med["bare"], 3), "presets": per_preset,
    }


# ------------------------------------------------------------------------------------------------ early exit
def forward_flops(fn: Callable[[], Any]) -> int:
    """The FLOPs ``fn`` runs, counted by ``torch.utils.flop_counter`` (load-independent, unlike a time); the
    CPU's fused attention kernel is counted as the two matrix products of attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def early_exit_real(arch: str, resolution: int, repeats: int = 3, device: str = "cpu", dtype: str | None = None,
                    text_layers: int | None = None) -> dict[str, Any]:
    """See the module docstring (suite ``early-exit``): a forward that captures one up level's output
    (``up_blocks.L``) and stops there, for every up level, vs the bare forward (alternated per repeat)."""
    from ..capture import catalog_of

    _progress(f"{arch}: building the real-size pipeline (random weights)")
    backbone = _backbone(arch, device, dtype, text_layers)
    levels = [a.name for a in catalog_of(backbone) if a.kind == "level-out" and a.name.startswith("up_blocks.")]
    if not levels:
        raise InvalidOptionError(f"the early-exit suite stops after a UNet up level; {arch} has none (use the features suite)")
    inputs = backbone.prepare([_image(resolution)], "", 50, 0, resolution)
    timed = _timer(device)
    for name in levels:  # warm-up
        _capture_forward(backbone, [name], inputs, True)
    t: dict[str, list[float]] = {"bare": [], **{name: [] for name in levels}}
    for i in range(repeats):
        _progress(f"{arch} early-exit: repeat {i + 1}/{repeats}")
        t["bare"].append(timed(lambda: backbone.denoise(inputs)))
        for name in levels:
            t[name].append(timed(lambda: _capture_forward(backbone, [name], inputs, True)))
    med = {k: statistics.median(v) for k, v in t.items()}
    _progress(f"{arch} early-exit: counting FLOPs")
    bare_flops = forward_flops(lambda: backbone.denoise(inputs))
    return {
        "suite": "early-exit", "arch": arch, "resolution": resolution, "repeats": repeats, **_environment(device, backbone),
        "seconds": {k: _median(v) for k, v in t.items()},
        "vs_bare_forward": {name: round(med[name] / med["bare"], 3) for name in levels},
        "bare_forward_gflops": round(bare_flops / 1e9, 1),
        "flops_vs_bare_forward": {
            name: round(forward_flops(lambda: _capture_forward(backbone, [name], inputs, True)) / bare_flops, 3) for name in levels
        },
    }


# ------------------------------------------------------------------------------------------------ vae
def vae_real(arch: str, resolution: int, repeats: int = 3, device: str = "cpu", dtype: str | None = None,
             text_layers: int | None = None, preset: str | None = None) -> dict[str, Any]:
    """See the module docstring (suite ``vae``)."""
    import torch

    from ..capture import Capture, catalog_of
    from ..presets import load_preset

    backbone = _backbone(arch, device, dtype, text_layers)
    catalog = catalog_of(backbone)
    names = [catalog.canonical(n) for n in load_preset(preset or _DEFAULT_PRESET[arch]).features]  # the paper's aliases
    pixels = backbone.preprocess([_image(resolution)], resolution)
    timed = _timer(device)
    low = [torch.bfloat16] + ([torch.float16] if device.startswith("cuda") else [])
    vae32 = backbone.pipeline.vae

    def features(latents):
        noise = backbone.make_noise(latents, 0)
        inputs = backbone.denoiser_inputs(backbone.add_noise(latents, 50, noise), 50, backbone.encode_prompt([""]),
                                          tuple(pixels.shape[-2:]))
        with Capture(backbone, names, inputs) as cap:
            backbone.denoise(inputs)
        return cap.activations

    ref_latents = backbone.encode_image(pixels).to(backbone.dtype)
    ref_feats = features(ref_latents)
    out = {"suite": "vae", "arch": arch, "resolution": resolution, "repeats": repeats, **_environment(device, backbone),
           "encode_dtype": {}}
    base = [timed(lambda: backbone.encode_image(pixels)) for _ in range(repeats)]
    import copy

    for dt in low:
        backbone.pipeline.vae = copy.deepcopy(vae32).to(dtype=dt)
        try:
            lat = backbone.encode_image(pixels).to(backbone.dtype)
            t = [timed(lambda: backbone.encode_image(pixels)) for _ in range(repeats)]
            feats = features(lat)
        finally:
            backbone.pipeline.vae = vae32
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))  # noqa: E731
        out["encode_dtype"][str(dt).replace("torch.", "")] = {
            "time_vs_fp32": round(statistics.median(t) / statistics.median(base), 3),
            "latent_relative_error": round(rel(lat, ref_latents), 5),
            "feature_relative_error": {n: round(rel(feats[n], ref_feats[n]), 5) for n in names},
        }
    out["fp32_encode_s"] = _median(base)
    return out


# ------------------------------------------------------------------------------------------------ throughput
def throughput_real(arch: str, resolution: int, repeats: int = 3, device: str = "cpu", dtype: str | None = None,
                    text_layers: int | None = None, batch_sizes: tuple[int, ...] = (1, 4, 8)) -> dict[str, Any]:
    """Images/s of ``Segmenter.segment`` (what ``segment``/``eval`` run) at each batch size, on
    ``max(batch_sizes)`` distinct images of one size; each batch size timed in turn per repeat."""
    from ..segment import Segmenter

    _progress(f"{arch}: building the real-size pipeline (random weights)")
    seg = Segmenter(_backbone(arch, device, dtype, text_layers), resolution=resolution)
    n = max(batch_sizes)
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)) for _ in range(n)]
    list(seg.segment(images[:1], _CAPTION_CLASSES))  # warm-up
    timed = _timer(device)
    t = {b: [] for b in batch_sizes}
    for i in range(repeats):
        for b in batch_sizes:
            _progress(f"{arch} throughput: repeat {i + 1}/{repeats}, batch {b}")
            t[b].append(timed(lambda: list(seg.segment(images, _CAPTION_CLASSES, batch_size=b))))
    ips = {b: n / statistics.median(v) for b, v in t.items()}
    return {
        "suite": "throughput", "arch": arch, "resolution": resolution, "repeats": repeats, "images": n,
        **_environment(device, seg.backbone),
        "images_per_s": {str(b): round(v, 3) for b, v in ips.items()},
        "vs_batch_1": {str(b): round(v / ips[batch_sizes[0]], 3) for b, v in ips.items()},
    }


# ------------------------------------------------------------------------------------------------ accounting
_ACCOUNTING_FAMILY = {"sd15": "sd", "sd21": "sd", "sdxl": "sdxl"}  # architecture -> GOCA settings family


def _meta_unet_kwargs(unet, resolution: int, text_tokens: int) -> dict[str, Any]:
    """Meta-device inputs of one UNet forward at ``resolution`` px (SDXL's added conditioning included)."""
    import torch

    c = unet.config
    lat = resolution // 8
    kwargs: dict[str, Any] = dict(
        sample=torch.zeros(1, c.in_channels, lat, lat, device="meta"), timestep=torch.tensor([100], device="meta"),
        encoder_hidden_states=torch.zeros(1, text_tokens, c.cross_attention_dim, device="meta"))
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.zeros(1, pooled, device="meta"),
                                           time_ids=torch.zeros(1, 6, device="meta"))
    return kwargs


def _first_pass_flops(unet, kwargs: dict[str, Any], reference_module: str) -> tuple[int, int]:
    """FLOPs of a bare UNet forward and of the two-pass observation's first pass (the forward stopped where
    the reference feature's attention module starts), counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..capture import StopForward

    def stop(*_: Any) -> None:
        raise StopForward

    with torch.no_grad():
        with FlopCounterMode(display=False) as bare:
            unet(**kwargs)
        handle = unet.get_submodule(reference_module).register_forward_pre_hook(stop)
        try:
            with FlopCounterMode(display=False) as first:
                try:
                    unet(**kwargs)
                except StopForward:
                    pass
        finally:
            handle.remove()
    return int(bare.get_total_flops()), int(first.get_total_flops())


def accounting_real(arch: str, resolution: int, repeats: int = 1, device: str = "cpu", dtype: str | None = None,
                    text_layers: int | None = None) -> dict[str, Any]:
    """Memory accounting without a forward (the denoiser on the meta device; any resolution, any size):
    the fp32 maps one GOCA segmentation keeps under the family's default settings
    (:func:`difffeat.segment.memory.maps_kept_mb`, what ``memory="auto"`` decides from): in one pass
    (``kept_maps_mb``: a ``[HW, T]`` cross map per attention block, its self map reduced during the forward
    to at most the reference grid, one ``[HW, HW]`` refinement sum, the reference feature) and in two passes
    (``kept_maps_two_pass_mb``: the cross maps, the refinement sum, the reference tokens, ``U^T P`` per coarser
    grid); vs a head-mean ``[HW, HW]`` self map per block (``kept_maps_full_self_mb``) and vs storing every
    head's maps; per attention grid. The two-pass observation's first pass (the forward up to the reference
    feature) in FLOPs of a bare forward, counted on the meta device. UNet architectures only (their blocks'
    grids follow from the names)."""
    from ..architectures import architecture, build_denoiser
    from ..segment.memory import MapGeometry, choose_passes, maps_kept_mb
    from ..segment.settings import settings_for

    if "unet" not in architecture(arch)["components"]:
        raise InvalidOptionError(f"the accounting suite covers UNet architectures (sd15, sd21, sdxl), not {arch!r}")
    unet = build_denoiser(arch)
    levels = len(unet.config.block_out_channels)
    latent = resolution // 8
    settings = settings_for(arch, _ACCOUNTING_FAMILY[arch])

    def side(name: str) -> int:
        kind, index = name.split(".")[:2]
        factor = 2 ** (int(index) if kind == "down_blocks" else levels - 1 - int(index) if kind == "up_blocks" else levels - 1)
        return -(-latent // factor)

    grids: dict[int, dict[str, int]] = {}
    blocks: dict[str, int] = {}  # transformer block: grid side
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            entry = grids.setdefault(side(name), {"blocks": 0, "heads": module.heads})
            entry["blocks"] += 1
            blocks[name[: -len(".attn1")]] = side(name)
    text = 77
    ref = side(settings.ref_block)
    refine = {side(b) for b in settings.refine_blocks} if settings.refine_order > 0 else set()
    # summed during the forward only where a refinement map is not kept whole anyway (finer than the reference)
    refine = sorted(refine) if any(g > ref for g in refine) else []
    mib = lambda n: round(n * 4 / 2**20, 1)  # noqa: E731 - fp32 elements -> MiB
    per_grid = {f"{g}x{g}": {**v, "self_map_mb": mib((g * g) ** 2), "kept_self_map_mb": mib((min(g, ref) ** 2) ** 2),
                             "cross_map_mb": mib(g * g * text)}
                for g, v in sorted(grids.items(), reverse=True)}
    blocks_x = lambda key: sum(v["blocks"] * v[key] for v in per_grid.values())  # noqa: E731
    cross = blocks_x("cross_map_mb")
    refine_mb = sum(mib((g * g) ** 2) for g in refine)  # one sum per grid (one grid: the largest, by default)
    every = sum(v["blocks"] * v["heads"] * (v["self_map_mb"] + v["cross_map_mb"]) for v in per_grid.values())
    ref_module = f"{settings.ref_block}.attn2"
    geo = MapGeometry(
        cross={f"{b}.attn2.map": (g, g) for b, g in blocks.items()},
        weight={f"{b}.attn1.map": (g, g) for b, g in blocks.items()} if settings.layers == "goca" else {},
        refine={f"{b}.attn1.map": (blocks[b], blocks[b]) for b in settings.refine_blocks} if settings.refine_order > 0 else {},
        reference=(ref, ref), ref_channels=unet.get_submodule(ref_module).to_q.out_features, text_tokens=text,
    )
    mode = (settings.pseudo_grid, settings.ref_channels == "first")
    bare_flops, first_flops = _first_pass_flops(unet, _meta_unet_kwargs(unet, resolution, text), ref_module)
    return {"suite": "accounting", "arch": arch, "resolution": resolution, "repeats": 1, "device": "meta",
            "dtype": "float32", "threads": 0, "reference_grid": f"{ref}x{ref}", "per_grid": per_grid,
            "kept_maps_mb": round(maps_kept_mb(geo, "one-pass", *mode), 1),
            "kept_maps_two_pass_mb": round(maps_kept_mb(geo, "two-pass", *mode), 1),
            "auto_passes": choose_passes("auto", geo, 1, settings.map_budget_mb, *mode),
            "map_budget_mb": settings.map_budget_mb,
            "refine_sum_mb": round(refine_mb, 1),
            "kept_maps_full_self_mb": round(cross + blocks_x("self_map_mb"), 1),
            "kept_maps_every_head_mb": round(every, 1), "cross_maps_only_mb": round(cross, 1),
            "bare_forward_gflops": round(bare_flops / 1e9, 1),
            "first_pass_flops_vs_bare": round(first_flops / bare_flops, 3)}


REAL_SUITES: dict[str, Callable[..., dict[str, Any]]] = {
    "accounting": accounting_real,
    "goca": goca_real, "features": features_real, "early-exit": early_exit_real, "vae": vae_real,
    "throughput": throughput_real,
}


def real_benchmark(suite: str, arch: str, **kwargs: Any) -> dict[str, Any]:
    """Run one suite on a real-size architecture (see the module docstring)."""
    from ..architectures import architecture_aliases, architecture_names

    if suite not in REAL_SUITES:
        raise InvalidOptionError(f"unknown suite {suite!r} for --arch {arch}; choose one of {', '.join(REAL_SUITES)}")
    aliases = architecture_aliases()
    if arch not in architecture_names() and arch not in aliases:
        raise InvalidOptionError(f"unknown architecture {arch!r}; choose tiny or one of {', '.join(architecture_names())} "
                                 f"(or an alias: {', '.join(sorted(aliases))})")
    figures = REAL_SUITES[suite](aliases.get(arch, arch), **kwargs)  # figures name the file, not the alias
    if kwargs.get("text_layers") is not None:
        figures["text_layers"] = kwargs["text_layers"]  # part of the command that reproduces them
    return figures
