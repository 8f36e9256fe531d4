"""The Gradio demo behind ``difffeat demo`` (``apps/demo.py`` is a launcher for it).

Four tabs over the public API: *Segment* (:class:`difffeat.Segmenter`), *Features* (the catalog and
:class:`difffeat.FeatureExtractor` with a PCA view), *Content shift* (``difffeat.shift.gate_img2img``) and
*Generate* (``difffeat.runs.generate_image``: a traced generation with its GOCA label map, CFG or S-CFG).
Gradio is imported only inside :func:`build_demo`, so the helpers here (:class:`ModelCache`, :func:`pca_rgb`,
:func:`run_segment`, :func:`run_generation` ...) work without it.

    from difffeat.demo import build_demo
    build_demo("shapes").queue(default_concurrency_limit=1).launch()
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .backbones.base import Backbone
from .capture import catalog_of
from .errors import DifffeatError, InvalidImageError, InvalidPromptError
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
    "GenerateOutput",
    "run_generation",
    "generation_stem",
    "preset_choices",
    "PRESET_PREFIX",
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
        fallback: kept for compatibility; no effect. The model list falls back to the embedded ``"shapes"``
            model, which ships with the package (the demo never builds a random-weight model).
        device: forwarded to :func:`difffeat.load`.
        model_configs: the config (hub id or diffusers folder) of each single-file checkpoint the demo may load,
            keyed by the file's path as typed in the model box (``config=`` of :func:`difffeat.load`).
    """

    def __init__(self, fallback: bool = True, device: str | None = None,
                 model_configs: dict[str, str] | None = None) -> None:
        self.fallback = fallback
        self.device = device
        self.model_configs = dict(model_configs or {})
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
            loaded = LoadedModel(load(name, device=self.device, config=self.model_configs.get(name)))
            if progress:
                progress(0.8, "building the activation catalog ...")
            catalog_of(loaded.backbone)
            self._models[name] = loaded
            return loaded

    def loaded(self, name: str) -> bool:
        """Whether ``name`` is loaded already."""
        return ((name or "").strip() or DEFAULT_MODEL) in self._models

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
    """What the Segment tab shows for one image: pictures enlarged to a readable size (nearest, so label
    colours stay exact), the label map at the image's size for download, and the class-word check."""

    overlay: Image.Image
    labels_view: Image.Image  # RGB, enlarged ``scale`` times (nearest)
    labels: Image.Image  # palette PNG at the image size (pixel value = label)
    legend: list[tuple[str, tuple[int, int, int]]]
    heatmaps: list[tuple[Image.Image, str]]
    result: Any  # SegmentationResult
    check: Any  # ClassCheck
    scale: int = 1


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
    """Segment ``image`` into ``classes`` with :class:`difffeat.Segmenter` (GOCA switches as given; None =
    the model's default), after :func:`~difffeat.segment.vocabulary.check_class_words` has left out the words
    the model does not know (``check.dropped``; their noise maps would take pixels from the known classes).
    Label colours are :func:`~difffeat.segment.outputs.label_colors` of the image (never its own colours)."""
    from . import Segmenter
    from .images import to_rgb
    from .segment.outputs import display_scale
    from .segment.vocabulary import check_class_words

    check = check_class_words(parse_classes(classes), model.backbone, drop_unknown=True)
    rgb = to_rgb(image)
    overrides = dict(t=t, heads=heads, layers=layers, rescale=rescale, tau=tau)
    seg = Segmenter(model.backbone, **{k: v for k, v in overrides.items() if v is not None})
    with model.lock:  # names already checked: the Segmenter re-warns (server log) only about unknown words
        result = seg(rgb, check.names)
    return SegmentOutput(*_result_view(rgb, result), result, check, display_scale(rgb.size))


def _result_view(rgb: Image.Image, result: Any) -> tuple:
    """(overlay, labels view, labels PNG, legend, heat maps) of a segmentation of ``rgb``: pictures enlarged to a
    readable size (nearest), label colours :func:`~difffeat.segment.outputs.label_colors` of the image."""
    from .segment.outputs import colorize, display_scale, enlarge, heatmap_image, label_colors, overlay

    colors = label_colors(rgb, len(result.classes))
    legend = [("background", tuple(int(c) for c in colors[0]))]
    legend += [(c, tuple(int(x) for x in colors[i])) for c, i in result.class_index.items()]
    scale = display_scale(rgb.size)
    maps = result.class_maps.float().numpy()  # [n_classes, h, w] at map resolution
    heat = [(heatmap_image(m, display_scale(m.shape[::-1], 256)), c) for m, c in zip(maps, result.classes)]
    labels = colorize(result.labels, colors)
    return (overlay(rgb, result.labels, scale=scale, colors=colors), enlarge(labels.convert("RGB"), scale), labels,
            legend, heat)


# --------------------------------------------------------------------------- generate
@dataclass
class GenerateOutput:
    """What the Generate tab shows: the generated image and its segmentation's pictures, enlarged to a readable
    size (nearest), the label map at the image's size for download, and the warnings about the class words."""

    image_view: Image.Image
    overlay: Image.Image
    labels_view: Image.Image
    labels: Image.Image  # palette PNG at the image size (pixel value = label)
    legend: list[tuple[str, tuple[int, int, int]]]
    heatmaps: list[tuple[Image.Image, str]]
    generated: Any  # difffeat.runs.GeneratedImage
    warnings: list[str]
    scale: int = 1


def run_generation(
    model: LoadedModel,
    prompt: str,
    classes: str | Sequence[str] | None,
    *,
    guidance: str = "scfg-goca",
    guidance_scale: float = 5.0,
    steps: int = 10,
    seed: int = 0,
) -> GenerateOutput:
    """Generate ``prompt``'s image with :func:`difffeat.runs.generate_image` and segment it into ``classes``
    (blank: the prompt's words the model can segment, :func:`difffeat.runs.prompt_class_words`). Typed words
    pass :func:`~difffeat.segment.vocabulary.check_class_words` first (unknown words left out, as in the
    Segment tab); a word the prompt does not contain is a warning naming the prompt's words."""
    from .runs import generate_image
    from .segment.outputs import display_scale, enlarge
    from .segment.vocabulary import check_class_words
    from .tracing import ClassNotInPromptWarning

    names = parse_classes(classes)
    notes: list[str] = []
    if names:
        check = check_class_words(names, model.backbone, drop_unknown=True)
        names = check.names
        notes += [f"“{a}” was read as “{b}”" for a, b in check.renamed.items()] + check.warnings
    with model.lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClassNotInPromptWarning)
        out = generate_image(model.backbone, prompt, names or None, guidance=guidance, guidance_scale=guidance_scale,
                             steps=steps, seed=seed)
    notes += [str(w.message) for w in caught if issubclass(w.category, ClassNotInPromptWarning)]
    rgb = out.image.convert("RGB")
    scale = display_scale(rgb.size)
    return GenerateOutput(enlarge(rgb, scale), *_result_view(rgb, out.result), out, notes, scale)


def generation_stem(prompt: str, seed: int, guidance: str, words: int = 6) -> str:
    """The file name stem of a generation's downloads: the prompt's first ``words`` words, the seed and the
    guidance (``"a-red-circle-and-a-blue_seed0_scfg-goca"``)."""
    slug = "-".join(re.findall(r"[a-z0-9]+", (prompt or "").lower())[:words]) or "generated"
    return f"{slug}_seed{int(seed)}_{guidance}"


def legend_html(legend: Sequence[tuple[str, tuple[int, int, int]]], pixels: dict[str, int] | None = None) -> str:
    """An HTML legend: the exact label colour of each class (as in the label map and the overlay's outlines)
    and its pixel count."""
    items = []
    for name, (r, g, b) in legend:
        count = f" ({pixels.get(name, 0)} px)" if pixels is not None else ""
        items.append(
            f'<span class="difffeat-legend-item" data-class="{_esc(name)}" data-rgb="{r},{g},{b}" '
            f'style="display:inline-flex;align-items:center;margin-right:1em">'
            f'<span style="width:1em;height:1em;background:rgb({r},{g},{b});border:1px solid #888;'
            f'display:inline-block;margin-right:.3em"></span>{_esc(name)}{count}</span>'
        )
    note = ('<div style="font-size:.85em;opacity:.8">label map: these colours exactly; overlay: tinted at 50% '
            "inside, outlined in the exact colour</div>")
    return '<div class="difffeat-legend">' + "".join(items) + note + "</div>"


def check_html(check: Any) -> str:
    """The class-word check as HTML: renamed names and one warning line per unknown word, each saying it was
    left out (``""`` if none)."""
    lines = [f"“{_esc(a)}” was read as “{_esc(b)}”" for a, b in check.renamed.items()]
    lines += [f"⚠️ {_esc(w)}" for w in check.warnings]
    return "".join(f'<div class="difffeat-warning">{x}</div>' for x in lines)


def known_classes_text(backbone: Backbone) -> str:
    """One Markdown line naming the class words of a closed-vocabulary model (``""`` for open vocabularies)."""
    from .segment.vocabulary import model_vocabulary

    vocab = model_vocabulary(backbone)
    if vocab is None:
        return ""
    return f"This model knows {len(vocab.classes)} classes: " + ", ".join(f"`{c}`" for c in vocab.classes)


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


def catalog_view_rows(rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """:func:`catalog_rows` as the page's table shows them: HTML names with a line-break opportunity
    (``<wbr>``, not a character: copied names stay exact) after each ``.``, so a long name wraps at its dots on a
    narrow screen instead of pushing the other columns out or breaking mid-word."""
    return [[_esc(r[0]).replace(".", ".<wbr>"), *r[1:]] for r in rows]


def catalog_name(cell: str) -> str:
    """The activation name of a :func:`catalog_view_rows` name cell."""
    import re

    return re.sub(r"<[^>]*>", "", str(cell)).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")


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
    """``preset:NAME`` for every feature preset that fits ``backbone`` (:func:`difffeat.presets.presets_for`),
    the recommended one (:func:`difffeat.presets.recommended_preset`) first."""
    from .presets import presets_for, recommended_preset

    first = recommended_preset(backbone)
    names = sorted(presets_for(backbone), key=lambda n: n != first)
    return [PRESET_PREFIX + name for name in names]


def run_features(
    model: LoadedModel, image: Any, name: str, prompt: str = "", t: int | None = None
) -> tuple[Image.Image, dict[str, torch.Tensor], dict]:
    """Extract activation ``name`` (or every activation of ``preset:NAME``) of ``image``.

    Returns the PCA picture (of the activations upsampled to the largest map and concatenated, for a preset)
    at the image size enlarged to a readable size (nearest), ``{activation: [C, H, W]}`` and the extraction
    settings. ``t=None``: the preset's timestep, else the model's feature default."""
    from . import FeatureExtractor, upsample_concat
    from .images import to_rgb
    from .segment.outputs import display_scale

    if not name:
        raise InvalidPromptError("no activation chosen: pick a preset:NAME entry (a tested selection) or one activation")
    rgb = to_rgb(image)
    t = None if t is None else int(t)
    if name.startswith(PRESET_PREFIX):
        fx = FeatureExtractor(model.backbone, preset=name[len(PRESET_PREFIX) :], t=t)
    else:
        fx = FeatureExtractor(model.backbone, [name], t=t)
    with model.lock:
        feats = fx(rgb, prompt or "")
    tensors = {n: v[0] for n, v in feats.items()}
    k = display_scale(rgb.size)
    return pca_rgb(upsample_concat(feats)[0], (rgb.width * k, rgb.height * k)), tensors, fx.settings()


# --------------------------------------------------------------------------- UI
def gate_panels(cmp: Any) -> list[tuple[Image.Image, str]]:
    """The three captioned pictures of an img2img comparison, nearest-enlarged to a readable size, captioned
    :data:`GATE_CAPTIONS` (the page's CSS wraps captions rather than cutting them on a narrow screen)."""
    from .segment.outputs import display_scale, enlarge

    k = display_scale(cmp.input.size)
    w, h = cmp.input.size
    captions = (f"{GATE_CAPTIONS[0]} ({w}x{h} px)", *GATE_CAPTIONS[1:])
    return [(enlarge(img.convert("RGB").resize((w, h)), k), c) for img, c in zip((cmp.input, cmp.reference, cmp.treated), captions)]


#: captions of the input and of the img2img outputs without / with the technique
GATE_CAPTIONS = ("input", "without the technique", "with the technique")


def gate_html(cmp: Any) -> str:
    """The comparison's verdict sentence and a small table (measure, without, with, closer to the input)."""
    head = "<tr><th>measure</th><th>without</th><th>with</th><th>closer</th></tr>"
    rows = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in cmp.table())
    return (f'<p class="difffeat-verdict">{_esc(cmp.verdict())}</p>'
            f'<table class="difffeat-table">{head}{rows}</table>'
            '<p style="font-size:.85em;opacity:.8">without / with = img2img without / with the technique; '
            "&ldquo;technique helps&rdquo; means the PSNR with it is higher.</p>")


# --------------------------------------------------------------------------- UI
def bundled_examples(failures: bool = False) -> list[tuple[str, str]]:
    """(image path, "class, class") for every bundled example the shapes model segments well, or (``failures``)
    for those it fails on (:data:`difffeat.shapes.examples.KNOWN_FAILURES`)."""
    from .shapes.examples import read_examples

    return [(str(e["path"]), ", ".join(e["classes_present"])) for e in read_examples(EXAMPLES_DIR)
            if bool(e["known_failure"]) == failures]


def example_label(path: str, classes: str) -> str:
    """The button text of an example: its number and its classes (``"0006 · cross, square"``)."""
    return f"{Path(path).stem.rsplit('_', 1)[-1]} · {classes}"


def known_failure(path: str) -> str:
    """How the shapes model fails on the bundled example ``path`` (``""`` if it does not)."""
    from .shapes.examples import KNOWN_FAILURES

    return KNOWN_FAILURES.get(Path(path).name, "")


def image_stem(image: Any) -> str:
    """The file name (without suffix) an uploaded image came from, for naming its downloads (``"image"`` when
    unknown, e.g. a pasted picture)."""
    name = getattr(image, "info", {}).get(SOURCE_NAME_KEY) if image is not None else None
    stem = Path(str(name)).stem if name else "image"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) or "image"


#: ``PIL.Image.info`` key under which the demo's image component records the uploaded file's name
SOURCE_NAME_KEY = "difffeat_source_name"


def _user_error(exc: Exception):
    import gradio as gr

    return gr.Error(str(exc), print_exception=False)


class UnreadableImage:
    """What the demo's image component hands a handler for an upload PIL cannot open: the message to show."""

    def __init__(self, message: str) -> None:
        self.message = message


def _image_component():
    """``gr.Image`` that records the uploaded file's name (:data:`SOURCE_NAME_KEY`, for download names) and
    hands an unreadable upload on as :class:`UnreadableImage` (a short :class:`InvalidImageError` message
    naming the uploaded file, not the server's temporary copy); stock ``gr.Image`` fails in preprocessing
    with a PIL traceback, before any handler could say so beside its button."""
    import gradio as gr

    class CheckedImage(gr.Image):
        is_template = True  # rendered by the stock Image frontend

        def preprocess(self, payload):
            name = getattr(payload, "orig_name", None) or Path(getattr(payload, "path", "") or "upload").name
            try:
                img = super().preprocess(payload)
            except gr.Error:
                raise
            except Exception:  # noqa: BLE001 - any decoding failure is a user error here
                return UnreadableImage(str(InvalidImageError(
                    f"cannot read image file {name!r}: it is not a PNG, JPEG, WebP or other image file that PIL can "
                    "open; upload an image or pick a bundled example"
                )))
            if isinstance(img, Image.Image):
                img.info[SOURCE_NAME_KEY] = name
            return img

    return CheckedImage


def _number(text: Any, kind: type, what: str) -> int | float | None:
    """A number typed into a text box (blank = None, the model's default)."""
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        raise _user_error(InvalidPromptError(f"{what} must be a number, got {text!r}; leave it blank for the model's default")) from None
    if kind is int and not value.is_integer():
        raise _user_error(InvalidPromptError(f"{what} must be a whole number, got {text!r}; leave it blank for the model's default"))
    return kind(value)


def error_html(message: str) -> str:
    """An error as the message line beside a button shows it (stays until the next run)."""
    return f'<div class="difffeat-error" role="alert">⚠️ {_esc(message)}</div>'


class ErrorBoard:
    """The last error of each browser session, kept so that a ``.failure`` step can write it beside the button
    (gradio's toast fades after seconds and its status badge says only "Error")."""

    def __init__(self, keep: int = 1000) -> None:
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()
        self.keep = keep

    @staticmethod
    def _key(request: Any) -> str:
        return str(getattr(request, "session_hash", None) or "")

    def raise_(self, request: Any, exc: BaseException) -> None:
        """Remember ``exc``'s message for ``request``'s session, then raise it as a ``gr.Error``."""
        import gradio as gr

        err = exc if isinstance(exc, gr.Error) else _user_error(exc)
        with self._lock:
            self._last.pop(self._key(request), None)
            self._last[self._key(request)] = str(err.message)
            while len(self._last) > self.keep:  # sessions that never show their error (API clients)
                self._last.pop(next(iter(self._last)))
        raise err from None

    def pop(self, request: Any) -> str:
        """The session's last error message (forgotten once read), or a generic line."""
        with self._lock:
            return self._last.pop(self._key(request), "something went wrong; see the server log")


#: the Generate tab's first prompt (a caption of the shapes world, the default model's own caption style)
GENERATE_PROMPT = "a red circle and a blue star on a striped green background"

#: one line of help for each Advanced option (the GOCA switches; method: shared/method.md section 3)
ADVANCED_HELP = {
    "t": "how much noise is added before the one denoiser forward that is read (0 = none, 999 = pure noise); "
         "blank = the model's tuned default",
    "heads": "goca: weight each attention head by its share of the layer's output at that pixel; "
             "mean: plain average over heads",
    "layers": "goca: weight each layer by how well its self-attention matches a reference feature's; "
              "uniform: every layer counts the same",
    "rescale": "goca: divide each class score by the attention all named things get at that pixel; "
               "none: blur and min-max only",
    "tau": "background threshold: a pixel is background unless some class scores above tau (0-1 scale); "
           "blank = the model's tuned default",
}

CSS = """
#seg-image img, #f-image img, #g-image img, #gen-image img, #gen-overlay img, #gen-labels img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
.difffeat-warning { color: #a15c00; font-weight: 600; }
.difffeat-error { color: #b00020; font-weight: 600; padding: .4em .6em; border: 1px solid #b00020; border-radius: 6px;
                  background: #fff0f0; }
/* galleries as tall as their pictures, no fixed blank box below */
#seg-heat .grid-wrap, #g-panels .grid-wrap, #gen-heat .grid-wrap { min-height: 0 !important; height: auto !important; max-height: none !important; }
#seg-heat .grid-container, #g-panels .grid-container, #gen-heat .grid-container { padding-top: 30px !important; }  /* below the gallery's label */
/* gallery captions wrap instead of being cut ("without" / "with" must stay apart on a phone), under the picture */
#seg-heat .caption-label, #g-panels .caption-label, #gen-heat .caption-label { white-space: normal !important; overflow: visible !important;
                  text-overflow: clip !important; max-width: 100% !important; position: static !important;
                  display: block; text-align: center; }
#seg-heat .thumbnail-item, #g-panels .thumbnail-item, #gen-heat .thumbnail-item { aspect-ratio: auto !important; height: auto !important;
                  overflow: visible !important; }
#seg-heat .thumbnail-item img, #g-panels .thumbnail-item img,
#gen-heat .thumbnail-item img { object-fit: contain !important; height: auto !important;
                  width: 100% !important; image-rendering: pixelated; }
.difffeat-table { border-collapse: collapse; font-size: .9em; }
.difffeat-table th, .difffeat-table td { border: 1px solid #ccc; padding: .2em .5em; text-align: left; }
.difffeat-verdict { font-weight: 600; }
#f-info code { white-space: normal; overflow-wrap: anywhere; }
/* download names wrap instead of being cut ("a-red-circl... .png" four times on a phone) */
#gen-files td.filename, #seg-file td.filename, #f-file td.filename { flex: 1 1 auto !important; width: auto !important; }
#gen-files .filename .stem, #seg-file .filename .stem, #f-file .filename .stem { white-space: normal !important;
                  overflow-wrap: anywhere !important; text-overflow: clip !important; overflow: visible !important; }
#gen-files .filename .ext, #seg-file .filename .ext, #f-file .filename .ext { flex: none !important; white-space: nowrap !important; }
#gen-files td.download, #seg-file td.download, #f-file td.download { flex: 0 0 auto !important; min-width: 0 !important;
                  width: auto !important; white-space: nowrap; }  /* long activation names wrap on a phone */
/* the catalog: names wrap at their dots (<wbr>), never mid-word; on a phone name and kind fill the screen and
   shape (C x H x W, which holds the resolution) is a swipe away; resolution and flags give way */
#f-catalog .text.wrap { word-break: normal !important; overflow-wrap: normal !important; }
@media (max-width: 640px) {
  /* the four tab names fit a phone's width (gradio moves tabs that do not fit into a "more" menu) */
  .tab-container button { padding-left: .4em !important; padding-right: .4em !important; font-size: 14px !important; }
  #f-catalog { font-size: 12px; }
  #f-catalog th:nth-child(n+4), #f-catalog td:nth-child(n+4), #f-catalog .body-cell:nth-child(n+4) { display: none !important; }
  #f-catalog td, #f-catalog th, #f-catalog .cell-wrap { white-space: normal !important; }
}
"""

#: the JavaScript of the class checkboxes: a tick adds its class to the typed ones, an untick removes it;
#: typed words that are not offered stay
_OFFER_JS = """(picked, typed) => {
    const offered = new Set([...document.querySelectorAll('#seg-offer label')]
        .filter(l => l.querySelector('input[type=checkbox]')).map(l => l.innerText.trim().toLowerCase()));
    const entries = (typed || '').split(',').map(s => s.trim()).filter(Boolean);
    const keep = entries.filter(e => !offered.has(e.toLowerCase()) || picked.includes(e.toLowerCase()));
    const have = new Set(keep.map(e => e.toLowerCase()));
    for (const p of picked) { if (!have.has(p)) { keep.push(p); have.add(p); } }
    return keep.join(', ');
}"""
#: ... and the typed classes (or an example's) tick their boxes
#: (every typed word is passed: the boxes render before or after this runs, and unoffered words tick nothing;
#: the list is wrapped in one more list, as gradio spreads a returned array over the outputs)
_TICK_JS = """(typed) => [[...new Set((typed || '').split(',').map(s => s.trim().toLowerCase()).filter(Boolean))]]"""


def build_demo(
    model: str = DEFAULT_MODEL,
    *,
    fallback: bool = True,
    device: str | None = None,
    cache: ModelCache | None = None,
    meter: ActivityMeter | None = None,
    preload: bool = False,
    model_config: str | None = None,
):
    """The demo as a ``gr.Blocks`` (call ``.queue(...).launch()`` on it).

    Args:
        model: the default model (hub id, local diffusers folder or "shapes").
        fallback: kept for compatibility; no effect (see :class:`ModelCache`).
        device: forwarded to :func:`difffeat.load`.
        cache / meter: shared :class:`ModelCache` / :class:`ActivityMeter` (tests inspect them).
        preload: load ``model`` now rather than on the first request.
        model_config: when ``model`` is a single-file checkpoint, its config (hub id or diffusers folder).

    Endpoints: ``segment`` (image, classes, model, t, heads, layers, rescale, tau; blank t/tau = the model's
    default) -> (overlay, labels view, legend HTML, heat maps, label PNG file, status, message);
    ``features`` (image, model, activation or preset:NAME, prompt, t) -> (PCA picture, .safetensors, info,
    status); ``gate`` (image, model, prompt, technique, strength, steps) -> (panels, verdict and table HTML,
    status); ``generate`` (prompt, classes, model, guidance, guidance scale, steps, seed) -> (image, overlay,
    labels view, legend HTML, heat maps, the downloads [image, label PNG, overlay, JSON], status, message).
    The page loads with the first bundled example segmented.
    """
    import gradio as gr

    UploadImage = _image_component()
    cache = cache or ModelCache(fallback=fallback, device=device,
                                model_configs={model: model_config} if model_config else None)
    meter = meter or ActivityMeter()
    errors = ErrorBoard()
    outdir = Path(tempfile.mkdtemp(prefix="difffeat-demo-"))
    if preload:
        cache.get(model)
    examples = bundled_examples()
    failures = bundled_examples(failures=True)

    def takes(**hints):
        """Give a handler real annotation objects: gradio finds its ``gr.Request`` / ``gr.SelectData``
        parameters by type hint, which it cannot resolve from this module's string annotations."""
        def deco(fn):
            fn.__annotations__ = dict(hints)
            return fn
        return deco

    def get_model(name: str, progress: gr.Progress) -> LoadedModel:
        try:
            return cache.get(name, progress=lambda f, d: progress(f, desc=d))
        except (DifffeatError, ValueError, OSError) as exc:
            raise _user_error(exc) from None

    def need_image(image) -> None:
        if image is None:
            raise gr.Error("no image: upload one or pick a bundled example first", print_exception=False)
        if isinstance(image, UnreadableImage):
            raise gr.Error(image.message, print_exception=False)

    def download_path(image, suffix: str) -> Path:
        """``<outdir>/<unique>/<input name>-<suffix>``: named after the input, never overwriting another's."""
        folder = Path(tempfile.mkdtemp(dir=outdir))
        return folder / f"{image_stem(image)}-{suffix}"

    def uploaded(image):
        """An upload PIL cannot open: cleared (no broken-image icon) and said beside the button."""
        if isinstance(image, UnreadableImage):
            return gr.update(value=None), error_html(image.message)
        return gr.skip(), ""

    @takes(request=gr.Request)
    def show_error(request: gr.Request):
        return error_html(errors.pop(request))

    @takes(request=gr.Request)
    def load_model(name: str, request: gr.Request, progress=gr.Progress()):
        try:
            get_model(name, progress)
        except gr.Error as exc:
            errors.raise_(request, exc)
        return cache.describe(name)

    @takes(request=gr.Request)
    def load_failed(name: str, request: gr.Request):
        return (f"⚠️ **{(name or '').strip() or DEFAULT_MODEL}** could not be loaded: {errors.pop(request)} "
                "— every tab uses the model named in the box; put back one that loads (e.g. `shapes`).")

    @takes(request=gr.Request)
    def model_state(name: str, request: gr.Request, progress=gr.Progress()):
        """After a model loads: status line, the classes a closed-vocabulary model knows, t/tau placeholders."""
        from .segment.settings import settings_for
        from .segment.vocabulary import model_vocabulary

        try:
            b = get_model(name, progress).backbone
        except gr.Error as exc:
            errors.raise_(request, exc)
        known = known_classes_text(b)
        vocab = model_vocabulary(b)
        seg_defaults = settings_for(str(b.name), b.family)
        return (
            cache.describe(name),
            gr.update(value=known, visible=bool(known)),
            gr.update(choices=list(vocab.classes) if vocab else [], visible=vocab is not None),
            gr.update(placeholder=f"blank = the model's default ({seg_defaults.t})"),
            gr.update(placeholder=f"blank = the model's default ({seg_defaults.tau:g})"),
        )

    @takes(request=gr.Request)
    def first_page(name: str, request: gr.Request, progress=gr.Progress()):
        """On page load: :func:`model_state` and the first bundled example in the Segment tab (segmented next)."""
        first = examples[0] if examples else (None, "")
        return (*model_state(name, request, progress), *first)

    @takes(request=gr.Request)
    def segment(image, classes, model_name, t, heads, layers, rescale, tau, request: gr.Request, progress=gr.Progress()):
        with meter:
            try:
                need_image(image)
                t, tau = _number(t, int, "timestep t"), _number(tau, float, "background tau")
                m = get_model(model_name, progress)
                progress(None, desc="segmenting (one denoiser forward) ...")
                out = run_segment(m, image, classes, t=t, heads=heads, layers=layers, rescale=rescale, tau=tau)
            except (gr.Error, DifffeatError, ValueError) as exc:
                errors.raise_(request, exc)
            for w in out.check.warnings:
                gr.Warning(w)
            path = download_path(image, "labels.png")
            out.labels.save(path, format="PNG")
            pixels = out.result.to_json()["pixels_per_class"]
            w, h = out.labels.size
            done = f"segmented {w}x{h} px at t={out.result.settings['t']}, tau={out.result.settings['tau']:g}"
            if out.scale > 1:
                done += f"; shown {out.scale}x enlarged (nearest), the download is {w}x{h}"
            return (out.overlay, out.labels_view, legend_html(out.legend, pixels), out.heatmaps, str(path),
                    cache.describe(model_name), check_html(out.check) + f"<div>{_esc(done)}</div>")

    def catalog_view(model_name, kinds, resolution, progress=gr.Progress()):
        m = get_model(model_name, progress)
        rows = catalog_rows(m.backbone, kinds or (), resolution)
        all_rows = catalog_rows(m.backbone)
        kind_choices = sorted({r[1] for r in all_rows})
        res_choices = ["any"] + sorted({r[3] for r in all_rows}, key=lambda s: (s == "map", s))
        presets = preset_choices(m.backbone)
        names = presets + [r[0] for r in all_rows]
        return (
            gr.update(value=catalog_view_rows(rows)),
            gr.update(choices=kind_choices),
            gr.update(choices=res_choices),
            gr.update(choices=names, value=names[0] if names else None),
        )

    @takes(evt=gr.SelectData)
    def pick_row(evt: gr.SelectData):
        """A click on a catalog row selects that row's activation."""
        row = evt.row_value or []
        return gr.update(value=catalog_name(row[0])) if row else gr.skip()

    @takes(request=gr.Request)
    def features(image, model_name, name, prompt, t, request: gr.Request, progress=gr.Progress()):
        with meter:
            try:
                need_image(image)
                t = _number(t, int, "timestep t")
                m = get_model(model_name, progress)
                progress(None, desc="extracting (one denoiser forward) ...")
                pic, tensors, settings = run_features(m, image, name, prompt, t)
            except (gr.Error, DifffeatError, ValueError) as exc:
                errors.raise_(request, exc)
            from .io import save_features

            path = download_path(image, "features.safetensors")
            save_features(path, tensors, metadata=settings)
            shapes = "; ".join(f"`{n}`: {tuple(v.shape)}" for n, v in tensors.items())
            source = "given" if t is not None else "the preset's" if name.startswith(PRESET_PREFIX) else "the model's default"
            what = name if name.startswith(PRESET_PREFIX) else "activation"
            info = f"{what} at t={settings['t']} ({source}): {shapes} (C, H, W)"
            return pic, str(path), info, cache.describe(model_name)

    @takes(request=gr.Request)
    def gate(image, model_name, prompt, technique, strength, steps, request: gr.Request, progress=gr.Progress()):
        with meter:
            try:
                need_image(image)
                m = get_model(model_name, progress)
                from .shift import gate_img2img, parse_technique

                progress(None, desc="two img2img runs ...")
                with m.lock:
                    cmp = gate_img2img(m.backbone, image, prompt or "", parse_technique(technique or "prompt"),
                                       strength=float(strength), steps=int(steps))
            except (gr.Error, DifffeatError, ValueError, TypeError) as exc:
                errors.raise_(request, exc)
            return gate_panels(cmp), gate_html(cmp), cache.describe(model_name)

    @takes(request=gr.Request)
    def generate(prompt, classes, model_name, guidance, guidance_scale, steps, seed, request: gr.Request,
                 progress=gr.Progress()):
        with meter:
            try:
                scale = _number(guidance_scale, float, "guidance scale")
                steps, seed = _number(steps, int, "steps"), _number(seed, int, "seed")
                if scale is None or steps is None or seed is None:
                    raise gr.Error("guidance scale, steps and seed need a number each (e.g. 5, 10, 0)", print_exception=False)
                m = get_model(model_name, progress)
                progress(None, desc=f"generating ({steps} steps) ...")
                out = run_generation(m, prompt or "", classes, guidance=guidance, guidance_scale=scale, steps=steps, seed=seed)
            except (gr.Error, DifffeatError, ValueError, TypeError) as exc:
                errors.raise_(request, exc)
            for w in out.warnings:
                gr.Warning(w)
            gen, result = out.generated, out.generated.result
            folder = Path(tempfile.mkdtemp(dir=outdir))
            stem = generation_stem(gen.prompt, gen.seed, gen.guidance)
            files = [folder / f"{stem}.png", folder / f"{stem}_labels.png", folder / f"{stem}_overlay.png",
                     folder / f"{stem}.json"]
            gen.image.save(files[0], format="PNG")
            out.labels.save(files[1], format="PNG")
            out.overlay.save(files[2], format="PNG")
            files[3].write_text(json.dumps({"prompt": gen.prompt, "seed": gen.seed, "guidance": gen.guidance,
                                            "guidance_scale": gen.guidance_scale, "steps": gen.steps,
                                            **result.to_json()}, indent=2))
            w, h = gen.image.size
            done = (f"generated {w}x{h} px: {gen.steps} steps, {gen.guidance} at guidance scale {gen.guidance_scale:g}, "
                    f"seed {gen.seed}; segmented into {', '.join(result.classes)}")
            if out.scale > 1:
                done += f"; shown {out.scale}x enlarged (nearest), the downloads are {w}x{h}"
            lines = "".join(f'<div class="difffeat-warning">⚠️ {_esc(n)}</div>' for n in out.warnings)
            pixels = result.to_json()["pixels_per_class"]
            return (out.image_view, out.overlay, out.labels_view, legend_html(out.legend, pixels), out.heatmaps,
                    [str(f) for f in files], cache.describe(model_name), lines + f"<div>{_esc(done)}</div>")

    def class_hint(prompt, model_name):
        """The class box's placeholder: the words of the prompt that a blank box segments."""
        from .runs import prompt_class_words

        if not cache.loaded(model_name):
            return gr.skip()
        words = prompt_class_words(prompt or "", cache.get(model_name).backbone)
        return gr.update(placeholder=("blank = the prompt's class words: " + ", ".join(words)) if words
                         else "the prompt names no class this model knows: type the words to segment")

    def shown(*components):
        """After a first result: show the output boxes that stayed hidden while empty (no blank boxes)."""
        updates = tuple(gr.update(visible=True) for _ in components)
        return lambda: updates if len(updates) > 1 else updates[0]

    def examples_block(inputs, label: str, items, elem_id: str, with_classes: bool = True):
        rows = [list(e) if with_classes else [e[0]] for e in items]
        labels = [example_label(*e) for e in items] if with_classes else None
        return gr.Examples(rows, inputs, label=label, elem_id=elem_id, example_labels=labels, api_visibility="private")

    hidden = dict(api_visibility="private", show_progress="hidden", queue=False)
    with gr.Blocks(title="difffeat demo") as demo:
        gr.Markdown("# difffeat\nDiffusion models as feature extractors and training-free segmenters (GOCA).")
        with gr.Row():
            model_box = gr.Textbox(value=model, label="model (\"shapes\", a hub id or a local diffusers folder)", scale=4,
                                   elem_id="model-box")
            load_btn = gr.Button("Load model", scale=1, elem_id="load-model")
        status = gr.Markdown(
            cache.describe(model) if cache.loaded(model) else "Loading the model ...", elem_id="model-status"
        )
        load_msg = gr.Markdown(elem_id="load-message")
        loaded = load_btn.click(load_model, [model_box], [status], api_name="load_model", show_progress_on=[load_msg])
        loaded.failure(load_failed, [model_box], [status], api_visibility="private", show_progress="hidden")

        with gr.Tab("Segment"):
            with gr.Row():
                with gr.Column():
                    image = UploadImage(type="pil", label="image", elem_id="seg-image", height=320, sources=["upload", "clipboard"])
                    classes = gr.Textbox(label="classes (comma-separated)", placeholder="circle, star", elem_id="seg-classes",
                                         render=False)
                    seg_examples = [examples_block([image, classes], "bundled examples: click one", examples, "seg-examples")]
                    classes.render()
                    known = gr.Markdown(visible=False, elem_id="seg-known")
                    offer = gr.CheckboxGroup([], label="tick classes to add them (typed ones stay)", visible=False,
                                             elem_id="seg-offer")
                    with gr.Accordion("Advanced", open=False, elem_id="seg-advanced"):
                        t_box = gr.Textbox(label="timestep t (0-999)", placeholder="blank = the model's default", elem_id="seg-t",
                                           info=ADVANCED_HELP["t"])
                        heads = gr.Radio(["goca", "mean"], value="goca", label="head aggregation", info=ADVANCED_HELP["heads"],
                                         elem_id="seg-heads")
                        layers = gr.Radio(["goca", "uniform"], value="goca", label="layer aggregation",
                                          info=ADVANCED_HELP["layers"], elem_id="seg-layers")
                        rescale = gr.Radio(["goca", "none"], value="goca", label="per-pixel rescaling",
                                           info=ADVANCED_HELP["rescale"], elem_id="seg-rescale")
                        tau = gr.Textbox(label="background tau", placeholder="blank = the model's default", elem_id="seg-tau",
                                         info=ADVANCED_HELP["tau"])
                    seg_btn = gr.Button("Segment", variant="primary", elem_id="seg-run")
                    seg_msg = gr.HTML(elem_id="seg-message")
                    if failures:
                        seg_examples.append(examples_block(
                            [image, classes], "known failure: " + "; ".join(known_failure(e[0]) for e in failures), failures,
                            "seg-failures"))
                with gr.Column():
                    overlay_out = gr.Image(type="pil", label="overlay", elem_id="seg-overlay", format="png", height=360)
                    labels_out = gr.Image(type="pil", label="label map", elem_id="seg-labels", format="png", height=360)
                    legend_out = gr.HTML(elem_id="seg-legend")
                    heat_out = gr.Gallery(label="class scores (0-1) at the attention maps' resolution", columns=3, height="auto",
                                          elem_id="seg-heat", format="png", allow_preview=False)
                    file_out = gr.File(label="label PNG at the image size (pixel value = class index, 0 = background)",
                                       elem_id="seg-file", height=90)
            offer.input(None, [offer, classes], [classes], js=_OFFER_JS, **hidden)
            classes.change(None, [classes], [offer], js=_TICK_JS, **hidden)
            image.upload(uploaded, [image], [image, seg_msg], api_visibility="private", show_progress_on=[seg_msg])
            seg_inputs = [image, classes, model_box, t_box, heads, layers, rescale, tau]
            seg_outputs = [overlay_out, labels_out, legend_out, heat_out, file_out, status, seg_msg]
            seg_btn.click(segment, seg_inputs, seg_outputs, api_name="segment", show_progress_on=[seg_msg]).failure(
                show_error, None, [seg_msg], api_visibility="private", show_progress="hidden")
            for ex in seg_examples:  # a click on an example shows its result, no Segment press needed
                ex.load_input_event.success(segment, seg_inputs, seg_outputs, api_visibility="private",
                                            show_progress_on=[seg_msg]).failure(
                    show_error, None, [seg_msg], api_visibility="private", show_progress="hidden")

        with gr.Tab("Features"):
            with gr.Row():
                with gr.Column():
                    f_image = UploadImage(type="pil", label="image", sources=["upload", "clipboard"], elem_id="f-image", height=320)
                    f_examples = examples_block([f_image], "bundled examples: click one", examples, "f-examples",
                                                with_classes=False)
                    act = gr.Dropdown([], label="activation (preset:NAME = a tested selection; or click a catalog row)",
                                      allow_custom_value=True, elem_id="f-act")
                    prompt = gr.Textbox(label="prompt", value="", info="text the model sees with the image (blank = none)")
                    f_t = gr.Textbox(label="timestep t (0-999)", placeholder="blank = the preset's or the model's default",
                                     elem_id="f-t", info="noise level of the one denoiser forward the activation is read from")
                    f_btn = gr.Button("Extract", variant="primary", elem_id="f-run")
                    f_msg = gr.HTML(elem_id="f-message")
                with gr.Column():
                    f_info = gr.Markdown("Pick an example or upload an image, then press **Extract**: the activation is "
                                         "shown as a picture (its top-3 principal components as RGB).", elem_id="f-info")
                    pca_out = gr.Image(type="pil", label="PCA of the activation (top-3 components as RGB)", format="png",
                                       elem_id="f-pca", visible=False, height=360)
                    f_file = gr.File(label="tensor (.safetensors)", elem_id="f-file", visible=False, height=90)
            with gr.Accordion("Activation catalog (click a row to pick it)", open=False, elem_id="f-catalog-box"):
                with gr.Row():
                    kind_filter = gr.Dropdown([], multiselect=True, label="filter: kind")
                    res_filter = gr.Dropdown(["any"], value="any", label="filter: resolution (HxW)")
                table = gr.Dataframe(headers=CATALOG_COLUMNS, label="activations", interactive=False, wrap=True,
                                     elem_id="f-catalog", datatype=["html", "str", "str", "str", "str"])
            view_inputs = [model_box, kind_filter, res_filter]
            view_outputs = [table, kind_filter, res_filter, act]
            kind_filter.input(catalog_view, view_inputs, view_outputs, api_visibility="private", show_progress_on=[f_msg])
            res_filter.input(catalog_view, view_inputs, view_outputs, api_visibility="private", show_progress_on=[f_msg])
            table.select(pick_row, None, [act], api_visibility="private", show_progress="hidden")
            f_image.upload(uploaded, [f_image], [f_image, f_msg], api_visibility="private", show_progress_on=[f_msg])
            extracted = f_btn.click(features, [f_image, model_box, act, prompt, f_t], [pca_out, f_file, f_info, status],
                                    api_name="features", show_progress_on=[f_msg])
            extracted.failure(show_error, None, [f_msg], api_visibility="private", show_progress="hidden")
            extracted.success(shown(pca_out, f_file), None, [pca_out, f_file], **hidden)
            picked = f_examples.load_input_event.success(  # a click on an example extracts from it
                features, [f_image, model_box, act, prompt, f_t], [pca_out, f_file, f_info, status],
                api_visibility="private", show_progress_on=[f_msg])
            picked.failure(show_error, None, [f_msg], api_visibility="private", show_progress="hidden")
            picked.success(shown(pca_out, f_file), None, [pca_out, f_file], **hidden)
            demo.load(lambda name, k, r, progress=gr.Progress(): catalog_view(name, k, r, progress),
                      view_inputs, view_outputs, api_name="catalog", show_progress_on=[f_msg])

        with gr.Tab("Content shift"):
            gr.Markdown(
                "**GATE img2img test**: img2img at high strength, once without and once with a generation "
                "technique. Content shift is the output drifting away from the input; the technique suppresses "
                "it when its output stays closer to the input (higher PSNR). Runs at the model's native "
                "resolution; pictures are shown enlarged (nearest)."
            )
            with gr.Row():
                with gr.Column():
                    g_image = UploadImage(type="pil", label="image", sources=["upload", "clipboard"], elem_id="g-image", height=320)
                    examples_block([g_image], "bundled examples: click one", examples, "g-examples", with_classes=False)
                    g_prompt = gr.Textbox(label="prompt", value="a photo of shapes", info="the img2img prompt, both runs")
                    g_tech = gr.Textbox(label="technique", value="prompt:quality=natural",
                                        info="prompt:quality=natural (adds quality words) | controlnet:MODEL | lora:PATH")
                    g_strength = gr.Slider(0.1, 1.0, value=0.75, step=0.05, label="strength",
                                           info="how much of the input is noised away (1 = all)")
                    g_steps = gr.Slider(1, 50, value=10, step=1, label="steps", elem_id="g-steps",
                                        info="denoising steps of each run (more = slower)")
                    g_btn = gr.Button("Compare", variant="primary", elem_id="g-run")
                    g_msg = gr.HTML(elem_id="g-message")
                with gr.Column():
                    g_verdict = gr.HTML("<p>Pick an example or upload an image, then press <b>Compare</b>.</p>",
                                        elem_id="g-verdict")
                    g_out = gr.Gallery(label="input | without | with the technique", columns=3, format="png", height="auto",
                                       elem_id="g-panels", visible=False, allow_preview=False)
            g_image.upload(uploaded, [g_image], [g_image, g_msg], api_visibility="private", show_progress_on=[g_msg])
            compared = g_btn.click(gate, [g_image, model_box, g_prompt, g_tech, g_strength, g_steps],
                                   [g_out, g_verdict, status], api_name="gate", show_progress_on=[g_msg])
            compared.failure(show_error, None, [g_msg], api_visibility="private", show_progress="hidden")
            compared.success(shown(g_out), None, [g_out], **hidden)

        with gr.Tab("Generate"):
            gr.Markdown(
                "**Segment what you generate**: the model generates an image from the prompt while GOCA reads its "
                "attention maps at every denoising step, so the image comes with its label map. Guidance: `cfg` "
                "(classifier-free guidance), `scfg-goca` (S-CFG, each region's guidance rescaled by GOCA masks) or "
                "`scfg` (S-CFG with its own masks)."
            )
            with gr.Row():
                with gr.Column():
                    gen_prompt = gr.Textbox(label="prompt", value=GENERATE_PROMPT, elem_id="gen-prompt", lines=2)
                    gen_classes = gr.Textbox(label="classes to segment (comma-separated words of the prompt)",
                                             placeholder="blank = the prompt's class words", elem_id="gen-classes")
                    gen_guidance = gr.Radio(["cfg", "scfg-goca", "scfg"], value="scfg-goca", label="guidance",
                                            elem_id="gen-guidance")
                    gen_scale = gr.Number(value=5.0, label="guidance scale (> 1)", elem_id="gen-scale",
                                          info="how strongly the prompt steers the image (S-CFG and CFG need > 1)")
                    gen_steps = gr.Slider(1, 50, value=10, step=1, label="steps", elem_id="gen-steps",
                                          info="denoising steps (more = slower)")
                    gen_seed = gr.Number(value=0, precision=0, label="seed", elem_id="gen-seed",
                                         info="the same seed and settings give the same image")
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-run")
                    gen_msg = gr.HTML(elem_id="gen-message")
                with gr.Column():
                    gen_info = gr.Markdown("Press **Generate**: the image, its label map and each class's scores appear "
                                           "here.", elem_id="gen-info")
                    with gr.Row():
                        gen_image = gr.Image(type="pil", label="generated image", format="png", elem_id="gen-image",
                                             visible=False, height=300, min_width=160)
                        gen_overlay = gr.Image(type="pil", label="overlay", format="png", elem_id="gen-overlay",
                                               visible=False, height=300, min_width=160)
                    gen_labels = gr.Image(type="pil", label="label map", format="png", elem_id="gen-labels", visible=False,
                                          height=300)
                    gen_legend = gr.HTML(elem_id="gen-legend")
                    gen_heat = gr.Gallery(label="class scores (0-1) at the attention maps' resolution", columns=3,
                                          height="auto", elem_id="gen-heat", format="png", allow_preview=False, visible=False)
                    gen_files = gr.File(label="downloads: image, label PNG (pixel value = class index), overlay, JSON",
                                        file_count="multiple", elem_id="gen-files", visible=False)
            gen_inputs = [gen_prompt, gen_classes, model_box, gen_guidance, gen_scale, gen_steps, gen_seed]
            gen_outputs = [gen_image, gen_overlay, gen_labels, gen_legend, gen_heat, gen_files, status, gen_msg]
            generated = gen_btn.click(generate, gen_inputs, gen_outputs, api_name="generate", show_progress_on=[gen_msg])
            generated.failure(show_error, None, [gen_msg], api_visibility="private", show_progress="hidden")
            generated.success(shown(gen_image, gen_overlay, gen_labels, gen_heat, gen_files), None,
                              [gen_image, gen_overlay, gen_labels, gen_heat, gen_files], **hidden)
            generated.success(lambda: gr.update(visible=False), None, [gen_info], **hidden)
            gen_prompt.change(class_hint, [gen_prompt, model_box], [gen_classes], **hidden)
            loaded.success(class_hint, [gen_prompt, model_box], [gen_classes], **hidden)  # another model's words

        page_outputs = [status, known, offer, t_box, tau]
        first = demo.load(first_page, [model_box], [*page_outputs, image, classes], api_visibility="private",
                          show_progress_on=[load_msg])
        first.success(segment, seg_inputs, seg_outputs, api_visibility="private", show_progress_on=[seg_msg])
        first.success(class_hint, [gen_prompt, model_box], [gen_classes], **hidden)  # the model has loaded now
        first.failure(load_failed, [model_box], [status], api_visibility="private", show_progress="hidden")
        loaded.success(model_state, [model_box], page_outputs, api_visibility="private", show_progress_on=[load_msg]).success(
            catalog_view, view_inputs, view_outputs, api_visibility="private", show_progress_on=[load_msg])

    demo.difffeat_cache = cache  # for tests and scripts
    demo.difffeat_meter = meter
    return demo


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
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, css=CSS)
    return demo


if __name__ == "__main__":  # pragma: no cover
    main()
