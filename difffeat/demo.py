"""The Gradio demo behind ``difffeat demo`` (``apps/demo.py`` is a launcher for it).

Three tabs over the public API: *Segment* (:class:`difffeat.Segmenter`), *Features* (the catalog and
:class:`difffeat.FeatureExtractor` with a PCA view) and *Content shift* (``difffeat.shift.gate_img2img``
when this version has it). Gradio is imported only inside :func:`build_demo`, so the helpers here
(:class:`ModelCache`, :func:`pca_rgb`, :func:`run_segment` ...) work without it.

    from difffeat.demo import build_demo
    build_demo("shapes").queue(default_concurrency_limit=1).launch()
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .backbones.base import Backbone
from .capture import catalog_of
from .errors import DifffeatError, InvalidImageError, InvalidPromptError, ModelNotFoundError
from .resources import package_dir

__all__ = [
    "DEFAULT_MODEL",
    "FALLBACK_NOTE",
    "ModelCache",
    "LoadedModel",
    "ActivityMeter",
    "SegmentOutput",
    "parse_classes",
    "run_segment",
    "legend_html",
    "catalog_rows",
    "pca_rgb",
    "run_features",
    "preset_choices",
    "PRESET_PREFIX",
    "gate_available",
    "bundled_examples",
    "build_demo",
    "main",
]

DEFAULT_MODEL = "shapes"
FALLBACK_NOTE = "random weights, for testing"
EXAMPLES_DIR = package_dir() / "examples"


# --------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A loaded backbone, the lock that serialises its forwards (hooks are per model), and a UI note."""

    backbone: Backbone
    note: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_fallback(self) -> bool:
        return bool(self.note)


class ModelCache:
    """Loads models on demand (``difffeat.load``) and keeps them.

    Args:
        fallback: when the embedded ``"shapes"`` model is missing from this installation, serve a tiny
            random SD pipeline instead, labelled :data:`FALLBACK_NOTE`. Once
            ``difffeat/weights/shapes/model_index.json`` exists the real model is loaded.
        device: forwarded to :func:`difffeat.load`.
    """

    def __init__(self, fallback: bool = True, device: str | None = None) -> None:
        self.fallback = fallback
        self.device = device
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str, progress: Callable[[float, str], None] | None = None) -> LoadedModel:
        """The model called ``name`` (hub id, local folder or "shapes"), loading it on first use."""
        from . import load

        name = (name or "").strip() or DEFAULT_MODEL
        with self._lock:
            if name in self._models:
                return self._models[name]
            if progress:
                progress(0.1, f"loading {name} ...")
            try:
                loaded = LoadedModel(load(name, device=self.device))
            except ModelNotFoundError:
                if not (self.fallback and name == DEFAULT_MODEL):
                    raise
                from .testing import tiny_pipeline

                loaded = LoadedModel(load(tiny_pipeline("sd"), device=self.device), note=FALLBACK_NOTE)
            if progress:
                progress(0.8, "building the activation catalog ...")
            catalog_of(loaded.backbone)
            self._models[name] = loaded
            return loaded

    def describe(self, name: str) -> str:
        """One Markdown line about a loaded model (family, native resolution, fallback warning)."""
        m = self.get(name)
        b = m.backbone
        text = f"**{name}**: {b.family} family, native resolution {b.native_resolution} px"
        if m.is_fallback:
            text += f" — ⚠️ the trained model is not installed: **{FALLBACK_NOTE}** (a tiny SD pipeline)"
        return text


class ActivityMeter:
    """Counts handler calls in flight; ``peak`` is the most seen at once (checks the queue limit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.calls = 0

    def __enter__(self) -> "ActivityMeter":
        with self._lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self.active -= 1


# --------------------------------------------------------------------------- segment
def parse_classes(text: str | Sequence[str] | None) -> list[str]:
    """Class names from a comma-separated string (blank entries dropped); validation is the library's."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    return [p.strip() for p in parts if p and p.strip()]


@dataclass
class SegmentOutput:
    """What the Segment tab shows for one image."""

    overlay: Image.Image
    labels: Image.Image  # palette PNG (pixel value = label)
    legend: list[tuple[str, tuple[int, int, int]]]
    heatmaps: list[tuple[Image.Image, str]]
    result: Any  # SegmentationResult


def run_segment(
    model: LoadedModel,
    image: Any,
    classes: str | Sequence[str],
    *,
    t: int | None = None,
    heads: str | None = None,
    layers: str | None = None,
    rescale: str | None = None,
    tau: float | None = None,
) -> SegmentOutput:
    """Segment ``image`` into ``classes`` with :class:`difffeat.Segmenter` (GOCA switches as given)."""
    from . import Segmenter
    from .images import to_rgb
    from .segment.outputs import colorize, overlay, palette
    from .segment.prompts import check_classes

    names = check_classes(parse_classes(classes))
    rgb = to_rgb(image)
    overrides = dict(t=None if t is None else int(t), heads=heads, layers=layers, rescale=rescale,
                     tau=None if tau is None else float(tau))
    seg = Segmenter(model.backbone, **{k: v for k, v in overrides.items() if v is not None})
    with model.lock:
        result = seg(rgb, names)
    colors = palette()
    legend = [("background", tuple(int(c) for c in colors[0]))]
    legend += [(c, tuple(int(x) for x in colors[i])) for c, i in result.class_index.items()]
    heat = [(Image.fromarray((result.heatmap(c) * 255).astype(np.uint8), mode="L"), c) for c in result.classes]
    return SegmentOutput(overlay(rgb, result.labels), colorize(result.labels), legend, heat, result)


def legend_html(legend: Sequence[tuple[str, tuple[int, int, int]]], pixels: dict[str, int] | None = None) -> str:
    """An HTML legend: a colour swatch per class (and its pixel count)."""
    items = []
    for name, (r, g, b) in legend:
        count = f" ({pixels.get(name, 0)} px)" if pixels is not None else ""
        items.append(
            f'<span class="difffeat-legend-item" data-class="{_esc(name)}" data-rgb="{r},{g},{b}" '
            f'style="display:inline-flex;align-items:center;margin-right:1em">'
            f'<span style="width:1em;height:1em;background:rgb({r},{g},{b});border:1px solid #888;'
            f'display:inline-block;margin-right:.3em"></span>{_esc(name)}{count}</span>'
        )
    return '<div class="difffeat-legend">' + "".join(items) + "</div>"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# --------------------------------------------------------------------------- features
CATALOG_COLUMNS = ["name", "kind", "shape", "resolution", "flags"]


def catalog_rows(backbone: Backbone, kinds: Sequence[str] = (), resolution: str | None = None) -> list[list[str]]:
    """Catalog rows ``[name, kind, shape, resolution, flags]``, optionally filtered by kinds and by a
    resolution written ``"HxW"`` (attention maps have none: "map")."""
    rows = []
    for a in catalog_of(backbone):
        res = "x".join(map(str, a.resolution)) if a.resolution else "map"
        if kinds and a.kind not in kinds:
            continue
        if resolution and resolution != "any" and res != resolution:
            continue
        rows.append([a.name, a.kind, "x".join(map(str, a.shape or ())), res, ", ".join(a.flags)])
    return rows


def pca_rgb(feature: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """RGB picture of a feature map ``[C, H, W]``: its top-3 principal components over pixels, min-max
    normalised per channel, nearest-upsampled to ``size`` (W, H). Fewer than 3 components are zero-padded."""
    c, h, w = feature.shape
    x = feature.float().reshape(c, h * w).T  # [pixels, C]
    x = x - x.mean(dim=0, keepdim=True)
    k = min(3, c, h * w)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = x @ v[:k].T  # [pixels, k]
    lo, hi = comps.amin(0, keepdim=True), comps.amax(0, keepdim=True)
    comps = (comps - lo) / (hi - lo).clamp_min(1e-12)
    rgb = torch.zeros(h * w, 3)
    rgb[:, :k] = comps
    img = Image.fromarray((rgb.reshape(h, w, 3).numpy() * 255).round().astype(np.uint8))
    return img.resize(size, Image.NEAREST) if size else img


#: activation-dropdown entries that name a feature preset instead of one activation
PRESET_PREFIX = "preset:"


def preset_choices(backbone: Backbone) -> list[str]:
    """``preset:NAME`` for every feature preset that fits ``backbone`` (:func:`difffeat.presets.presets_for`)."""
    from .presets import presets_for

    return [PRESET_PREFIX + name for name in presets_for(backbone)]


def run_features(
    model: LoadedModel, image: Any, name: str, prompt: str = "", t: int | None = None
) -> tuple[Image.Image, dict[str, torch.Tensor], dict]:
    """Extract activation ``name`` (or every activation of ``preset:NAME``) of ``image``.

    Returns the PCA picture at the image size (of the activations upsampled to the largest map and
    concatenated, for a preset), ``{activation: [C, H, W]}`` and the extraction settings."""
    from . import FeatureExtractor, upsample_concat
    from .images import to_rgb

    if not name:
        raise InvalidPromptError("pick an activation (or a preset:NAME entry) from the list first")
    rgb = to_rgb(image)
    t = None if t is None else int(t)
    if name.startswith(PRESET_PREFIX):
        fx = FeatureExtractor(model.backbone, preset=name[len(PRESET_PREFIX) :], t=t)
    else:
        fx = FeatureExtractor(model.backbone, [name], t=t)
    with model.lock:
        feats = fx(rgb, prompt or "")
    tensors = {n: v[0] for n, v in feats.items()}
    return pca_rgb(upsample_concat(feats)[0], rgb.size), tensors, fx.settings()


# --------------------------------------------------------------------------- content shift
def gate_available() -> bool:
    """Whether this version has ``difffeat.shift.gate_img2img`` (the GATE module)."""
    try:
        if importlib.util.find_spec("difffeat.shift") is None:
            return False
        import difffeat.shift as shift

        return callable(getattr(shift, "gate_img2img", None))
    except Exception:  # noqa: BLE001 - a half-installed module means "not available"
        return False


# --------------------------------------------------------------------------- UI
def bundled_examples() -> list[tuple[str, str]]:
    """(image path, "class, class") for every bundled example."""
    from .shapes.examples import read_examples

    return [(str(e["path"]), ", ".join(e["classes_present"])) for e in read_examples(EXAMPLES_DIR)]


def _user_error(exc: Exception):
    import gradio as gr

    return gr.Error(str(exc), print_exception=False)


def _image_component():
    """``gr.Image`` whose unreadable uploads raise the library's :class:`InvalidImageError` message as a
    ``gr.Error`` (stock ``gr.Image`` fails in preprocessing with a PIL traceback)."""
    import gradio as gr

    class CheckedImage(gr.Image):
        is_template = True  # rendered by the stock Image frontend

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - any decoding failure is a user error here
                from .images import to_rgb

                try:
                    to_rgb(payload.path)
                except DifffeatError as lib_exc:
                    raise _user_error(lib_exc) from None
                raise _user_error(InvalidImageError(f"could not read the upload as an image: {exc}")) from None

    return CheckedImage


def build_demo(
    model: str = DEFAULT_MODEL,
    *,
    fallback: bool = True,
    device: str | None = None,
    cache: ModelCache | None = None,
    meter: ActivityMeter | None = None,
    preload: bool = False,
):
    """The demo as a ``gr.Blocks`` (call ``.queue(...).launch()`` on it).

    Args:
        model: the default model (hub id, local diffusers folder or "shapes").
        fallback: serve a tiny random SD pipeline, clearly labelled, while "shapes" is not installed.
        device: forwarded to :func:`difffeat.load`.
        cache / meter: shared :class:`ModelCache` / :class:`ActivityMeter` (tests inspect them).
        preload: load ``model`` now rather than on the first request.

    The ``segment`` API endpoint takes (image, classes, model, t, heads, layers, rescale, tau) and
    returns (overlay, labels, legend HTML, heat maps, label PNG file, status).
    """
    import gradio as gr

    UploadImage = _image_component()
    cache = cache or ModelCache(fallback=fallback, device=device)
    meter = meter or ActivityMeter()
    outdir = Path(tempfile.mkdtemp(prefix="difffeat-demo-"))
    if preload:
        cache.get(model)

    def get_model(name: str, progress: gr.Progress) -> LoadedModel:
        try:
            return cache.get(name, progress=lambda f, d: progress(f, desc=d))
        except (DifffeatError, ValueError, OSError) as exc:
            raise _user_error(exc) from None

    def load_model(name: str, progress=gr.Progress()):
        get_model(name, progress)
        return cache.describe(name)

    def segment(image, classes, model_name, t, heads, layers, rescale, tau, progress=gr.Progress()):
        with meter:
            if image is None:
                raise gr.Error("upload an image or pick a bundled example first", print_exception=False)
            m = get_model(model_name, progress)
            progress(0.9, desc="segmenting ...")
            try:
                out = run_segment(m, image, classes, t=_opt_int(t), heads=heads, layers=layers, rescale=rescale, tau=_opt_float(tau))
            except (DifffeatError, ValueError) as exc:
                raise _user_error(exc) from None
            fd, path = tempfile.mkstemp(prefix="labels-", suffix=".png", dir=outdir)
            os.close(fd)
            out.labels.save(path, format="PNG")
            pixels = out.result.to_json()["pixels_per_class"]
            return (out.overlay, out.labels.convert("RGB"), legend_html(out.legend, pixels), out.heatmaps, path,
                    cache.describe(model_name))

    def catalog_view(model_name, kinds, resolution, progress=gr.Progress()):
        m = get_model(model_name, progress)
        rows = catalog_rows(m.backbone, kinds or (), resolution)
        all_rows = catalog_rows(m.backbone)
        kind_choices = sorted({r[1] for r in all_rows})
        res_choices = ["any"] + sorted({r[3] for r in all_rows}, key=lambda s: (s == "map", s))
        names = [r[0] for r in rows]
        return (
            gr.update(value=rows),
            gr.update(choices=kind_choices),
            gr.update(choices=res_choices),
            gr.update(choices=names + preset_choices(m.backbone), value=names[0] if names else None),
            cache.describe(model_name),
        )

    def features(image, model_name, name, prompt, t, progress=gr.Progress()):
        with meter:
            if image is None:
                raise gr.Error("upload an image or pick a bundled example first", print_exception=False)
            m = get_model(model_name, progress)
            try:
                pic, tensors, settings = run_features(m, image, name, prompt, _opt_int(t))
            except (DifffeatError, ValueError) as exc:
                raise _user_error(exc) from None
            from .io import save_features

            fd, path = tempfile.mkstemp(prefix="feature-", suffix=".safetensors", dir=outdir)
            os.close(fd)
            save_features(path, tensors, metadata=settings)
            shapes = "; ".join(f"`{n}`: {tuple(v.shape)}" for n, v in tensors.items())
            info = f"{name if name.startswith(PRESET_PREFIX) else 'activation'} at t={settings['t']}: {shapes} (C, H, W)"
            return pic, path, info

    def gate(image, model_name, prompt, technique, strength, steps, progress=gr.Progress()):
        with meter:
            if image is None:
                raise gr.Error("upload an image or pick a bundled example first", print_exception=False)
            m = get_model(model_name, progress)
            from .shift import gate_img2img, parse_technique

            try:
                with m.lock:
                    cmp = gate_img2img(m.backbone, image, prompt or "", parse_technique(technique or "prompt"),
                                       strength=float(strength), steps=int(steps))
            except (DifffeatError, ValueError, TypeError) as exc:
                raise _user_error(exc) from None
            return cmp.side_by_side(), cmp.to_json()

    with gr.Blocks(title="difffeat demo") as demo:
        gr.Markdown("# difffeat\nDiffusion models as feature extractors and training-free segmenters (GOCA).")
        with gr.Row():
            model_box = gr.Textbox(value=model, label="model (\"shapes\", a hub id or a local diffusers folder)", scale=4)
            load_btn = gr.Button("Load model", scale=1)
        status = gr.Markdown(
            "Model not loaded yet: it loads on the first request (or press *Load model*)."
            + (f" If the trained shapes model is not installed, a tiny model with **{FALLBACK_NOTE}** is used."
               if fallback else ""),
            elem_id="model-status",
        )
        load_btn.click(load_model, [model_box], [status], api_name="load_model")

        with gr.Tab("Segment"):
            with gr.Row():
                with gr.Column():
                    image = UploadImage(type="pil", label="image", elem_id="seg-image", sources=["upload", "clipboard"])
                    classes = gr.Textbox(label="classes (comma-separated)", placeholder="circle, star", elem_id="seg-classes")
                    with gr.Accordion("Advanced", open=False):
                        t_box = gr.Number(value=None, label="timestep t (blank: the model's default)", precision=0)
                        heads = gr.Radio(["goca", "mean"], value="goca", label="head aggregation")
                        layers = gr.Radio(["goca", "uniform"], value="goca", label="layer aggregation")
                        rescale = gr.Radio(["goca", "none"], value="goca", label="per-pixel rescaling")
                        tau = gr.Number(value=None, label="background tau (blank: the model's default)")
                    seg_btn = gr.Button("Segment", variant="primary", elem_id="seg-run")
                    gr.Examples([list(e) for e in bundled_examples()], [image, classes], label="bundled examples")
                with gr.Column():
                    overlay_out = gr.Image(type="pil", label="overlay", elem_id="seg-overlay", format="png")
                    labels_out = gr.Image(type="pil", label="labels", elem_id="seg-labels", format="png")
                    legend_out = gr.HTML(elem_id="seg-legend")
                    heat_out = gr.Gallery(label="class heat maps", columns=4, elem_id="seg-heat")
                    file_out = gr.File(label="label PNG (pixel value = class index, 0 = background)", elem_id="seg-file")
            seg_btn.click(
                segment,
                [image, classes, model_box, t_box, heads, layers, rescale, tau],
                [overlay_out, labels_out, legend_out, heat_out, file_out, status],
                api_name="segment",
            )

        with gr.Tab("Features"):
            with gr.Row():
                kind_filter = gr.Dropdown([], multiselect=True, label="filter: kind")
                res_filter = gr.Dropdown(["any"], value="any", label="filter: resolution (HxW)")
                browse_btn = gr.Button("Show catalog")
            table = gr.Dataframe(headers=CATALOG_COLUMNS, label="activations", interactive=False, wrap=True)
            with gr.Row():
                with gr.Column():
                    f_image = UploadImage(type="pil", label="image", sources=["upload", "clipboard"])
                    act = gr.Dropdown([], label="activation (or preset:NAME)", allow_custom_value=True)
                    prompt = gr.Textbox(label="prompt", value="")
                    f_t = gr.Number(value=None, label="timestep t (blank: the model's default)", precision=0)
                    f_btn = gr.Button("Extract", variant="primary")
                    gr.Examples([[e[0]] for e in bundled_examples()], [f_image], label="bundled examples")
                with gr.Column():
                    pca_out = gr.Image(type="pil", label="PCA of the activation (top-3 components as RGB)", format="png")
                    f_info = gr.Markdown()
                    f_file = gr.File(label="tensor (.safetensors)")
            view_inputs = [model_box, kind_filter, res_filter]
            view_outputs = [table, kind_filter, res_filter, act, status]
            browse_btn.click(catalog_view, view_inputs, view_outputs, api_name="catalog")
            kind_filter.change(catalog_view, view_inputs, view_outputs, api_name=False)
            res_filter.change(catalog_view, view_inputs, view_outputs, api_name=False)
            f_btn.click(features, [f_image, model_box, act, prompt, f_t], [pca_out, f_file, f_info], api_name="features")

        with gr.Tab("Content shift"):
            if gate_available():
                gr.Markdown(
                    "GATE img2img test: img2img at high strength without and with a generation technique; "
                    "the output closer to the input (higher PSNR / edge IoU) suppresses content shift better. "
                    "Panels: input | without | with the technique."
                )
                with gr.Row():
                    with gr.Column():
                        g_image = UploadImage(type="pil", label="image", sources=["upload", "clipboard"])
                        g_prompt = gr.Textbox(label="prompt", value="a photo of shapes")
                        g_tech = gr.Textbox(label="technique", value="prompt:quality=natural",
                                            info="prompt:quality=natural | controlnet:MODEL | lora:PATH")
                        g_strength = gr.Slider(0.1, 1.0, value=0.75, step=0.05, label="strength")
                        g_steps = gr.Slider(1, 50, value=10, step=1, label="steps")
                        g_btn = gr.Button("Compare", variant="primary")
                        gr.Examples([[e[0]] for e in bundled_examples()], [g_image], label="bundled examples")
                    with gr.Column():
                        g_out = gr.Image(type="pil", label="input | without | with", format="png")
                        g_json = gr.JSON(label="similarity to the input")
                g_btn.click(gate, [g_image, model_box, g_prompt, g_tech, g_strength, g_steps], [g_out, g_json], api_name="gate")
            else:
                gr.Markdown(
                    "### Not available in this version\nThe GATE content-shift module (`difffeat.shift`) is not "
                    "part of this difffeat version, so the img2img comparison cannot run here.",
                    elem_id="shift-unavailable",
                )

    demo.difffeat_cache = cache  # for tests and scripts
    demo.difffeat_meter = meter
    return demo


def _opt_int(x: Any) -> int | None:
    return None if x is None or x == "" else int(x)


def _opt_float(x: Any) -> float | None:
    return None if x is None or x == "" else float(x)


def main(argv: Sequence[str] | None = None) -> None:
    """Start the demo: ``python -m difffeat.demo [--model M] [--port P] [--host H] [--concurrency N]``."""
    import argparse

    p = argparse.ArgumentParser(description="difffeat Gradio demo")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--concurrency", type=int, default=1, help="requests processed at once (forwards share one model)")
    args = p.parse_args(argv)
    launch(args.model, port=args.port, host=args.host, concurrency=args.concurrency)


def launch(model: str = DEFAULT_MODEL, *, port: int = 7860, host: str = "127.0.0.1", concurrency: int = 1,
           block: bool = True, **kwargs: Any):
    """Build, queue (``default_concurrency_limit=concurrency``) and launch the demo; returns the Blocks."""
    demo = build_demo(model, **kwargs)
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True)
    return demo


if __name__ == "__main__":  # pragma: no cover
    main()
