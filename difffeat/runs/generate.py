"""``difffeat generate``: prompts -> generated images with their GOCA label maps, a synthetic segmentation set.

One unit per prompt (sharded over processes, resumable): the pipeline generates the image under
:func:`difffeat.trace` (with ``--guidance cfg|scfg-goca|scfg``), then ``<id>.png`` (the image),
``<id>_labels.png``, ``<id>_overlay.png`` (and heat maps) and ``<id>.json`` are written, each atomically, the
JSON last (its presence marks the prompt done). Prompt ``i`` is generated from seed ``seed + i``, so a
restart or another process count gives the same images. How the traced steps combine into the label maps is
:func:`difffeat.trace`'s ``aggregate`` / ``self_step``; like every other setting they are in ``manifest.json``,
so a restart with other values is refused (or, with ``--overwrite``, recomputes everything). At the end the
main process writes ``coco.json``: a COCO instances file of the generated set (images, one RLE annotation per
class present, categories).

:func:`generate_image` is one such generation in memory (what the demo's *Generate* tab calls)::

    out = generate_image(backbone, "a red circle and a blue star on a green background", guidance="scfg-goca",
                         guidance_scale=5.0, steps=10, seed=0)
    out.image, out.result.labels, out.result.heatmap("star")
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checks import check_number, check_resolution
from ..errors import InvalidOptionError, InvalidPromptError
from ..io import write_bytes, write_json
from ..segment.outputs import save_result
from ..segment.segmenter import SegmentationResult
from ..segment.vocabulary import prompt_class_words
from ..tracing.scfg import SCFG
from ..tracing.session import AGGREGATES, ClassNotInPromptWarning, trace
from .engine import Run, RunSummary
from .manifest import Manifest
from .segment import segment_done

__all__ = ["PromptItem", "read_prompts", "prompt_classes", "check_aggregate", "COCO_FILE"]

COCO_FILE = "coco.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a generation run: ``id`` names its files; ``classes`` are the words segmented."""

    id: str
    prompt: str
    classes: tuple[str, ...]


@dataclass
class GenerateJob:
    """Options of a generation run."""

    out_dir: Path
    guidance: str = "scfg-goca"
    guidance_scale: float = 7.5
    steps: int = 20
    trace_steps: tuple[int, ...] | None = None
    seed: int = 0
    resolution: int | None = None
    aggregate: str = "maps"
    self_step: int | None = None
    heatmaps: bool = False
    overwrite: bool = False
    progress: bool = True


def read_prompts(prompts: list[str] | None = None, prompts_file: str | Path | None = None) -> list[tuple[str, str]]:
    """``(id, prompt)`` pairs from ``--prompt`` values (ids 0000, 0001, ...) and/or a file: ``.csv`` with a
    header (the prompt column is ``caption``, ``text`` or ``prompt``, else the last; the id column ``id`` or
    ``image_id``, else the row number), anything else one prompt per non-empty line."""
    pairs: list[tuple[str, str]] = [(f"{i:04d}", p) for i, p in enumerate(prompts or [])]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise InvalidOptionError(f"prompts file {str(path)!r} does not exist; pass a .txt (one prompt per line) or a .csv with a caption column")
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            if len(rows) < 2:
                raise InvalidOptionError(f"{path}: a CSV needs a header row and at least one prompt row")
            header = [h.strip().lower() for h in rows[0]]
            text = next((header.index(k) for k in ("caption", "text", "prompt") if k in header), len(header) - 1)
            ident = next((header.index(k) for k in ("id", "image_id") if k in header), None)
            for n, row in enumerate(rows[1:]):
                if len(row) <= text:
                    raise InvalidOptionError(f"{path}: row {n + 2} has no column {rows[0][text]!r}")
                pairs.append((row[ident].strip() if ident is not None and ident < len(row) else f"{len(pairs):04d}", row[text]))
        else:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            pairs += [(f"{len(pairs) + i:04d}", ln) for i, ln in enumerate(ln for ln in lines if ln)]
    if not pairs:
        raise InvalidOptionError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    seen: set[str] = set()
    for ident, prompt in pairs:
        if not prompt.strip():
            raise InvalidPromptError(f"prompt {ident!r} is empty")
        if not _ID.match(ident) or ident in seen:
            raise InvalidOptionError(f"prompt id {ident!r} is {'repeated' if ident in seen else 'not a usable file name'}: ids must be unique letters, digits, '_', '-', '.'")
        seen.add(ident)
    return pairs


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def prompt_classes(pairs: list[tuple[str, str]], classes: list[str] | None, backbone: Any = None) -> list[PromptItem]:
    """Each prompt's classes: the given ``classes`` that occur in it as words (an absent one warns with the
    prompt's words; a prompt with none of them is an error), or, with ``classes=None``, the prompt's default
    class words for ``backbone`` (:func:`prompt_class_words`, as the demo's Generate tab; a prompt with none
    is an error)."""
    if classes is None and backbone is None:
        raise ValueError("prompt_classes: the default classes (classes=None) depend on the model: pass its backbone")
    items = []
    for ident, prompt in pairs:
        words = _words(prompt)
        if classes is None:
            present = prompt_class_words(prompt, backbone)
            if not present:
                raise InvalidPromptError(_no_class_words(prompt, ident))
        else:
            low = " " + " ".join(words) + " "
            present = [c for c in classes if " " + " ".join(_words(c)) + " " in low]
            absent = [c for c in classes if c not in present]
            if not present:
                raise InvalidPromptError(
                    f"prompt {ident} {prompt!r} names none of the classes {classes} (its words: {', '.join(words)}); "
                    "name classes with the prompts' own words"
                )
            if absent:
                warnings.warn(f"prompt {ident} {prompt!r} does not name {absent} (its words: {', '.join(words)}); "
                              "its label map has no such class", ClassNotInPromptWarning, stacklevel=2)
        items.append(PromptItem(ident, prompt, tuple(present)))
    return items


def _no_class_words(prompt: str, ident: str | None = None) -> str:
    which = f"prompt {ident} {prompt!r}" if ident is not None else f"the prompt {prompt!r}"
    return (f"{which} names no class this model can segment (its words: {', '.join(_words(prompt))}); "
            "name the classes to segment")


def check_aggregate(aggregate: str, self_step: int | None, steps: int, trace_steps: tuple[int, ...] | None = None,
                    *, cli: bool = False) -> None:
    """Check :func:`difffeat.trace`'s ``aggregate`` and ``self_step`` of a ``steps``-step generation before
    anything runs: ``aggregate`` one of :data:`~difffeat.tracing.AGGREGATES`; ``self_step`` (``aggregate="maps"``
    only) a step of the schedule and one of ``trace_steps`` (None = every step). ``cli``: name the options as
    the command line does (``--self-step``)."""
    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if cli else key

    def setting(key: str, value: str) -> str:
        return f"{name(key)} {value}" if cli else f'{key}="{value}"'

    if aggregate not in AGGREGATES:
        raise InvalidOptionError(f"{name('aggregate')} must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if self_step is None:
        return
    if aggregate != "maps":
        raise InvalidOptionError(f"{name('self_step')} chooses the self-attention step of {setting('aggregate', 'maps')}; "
                                 f"{setting('aggregate', 'steps')} uses every traced step's self maps: drop {name('self_step')}")
    check_number(name("self_step"), self_step, 0, None, integer=True)
    if self_step >= steps:
        schedule = f"--steps {steps}" if cli else f"{steps} steps"
        raise InvalidOptionError(f"{name('self_step')} {self_step} is outside the schedule of {schedule} (0..{steps - 1})")
    if trace_steps is not None and self_step not in trace_steps:
        raise InvalidOptionError(f"{name('self_step')} {self_step} is not one of the traced steps "
                                 f"({name('trace_steps')} {list(trace_steps)}): trace it too, or choose one of them")


@dataclass
class GeneratedImage:
    """One traced generation (:func:`generate_image`).

    Attributes:
        image: the generated RGB image.
        result: GOCA's segmentation of it from the traced maps (``labels`` at the image size, per-class
            ``class_maps`` / ``heatmap(word)``, ``classes`` in prompt order).
        prompt / seed / guidance / guidance_scale / steps / trace_steps / aggregate: how it was generated
            (``trace_steps`` None = every step).
        self_step: the step whose self-attention maps gave the layer weights and refinement (``aggregate="maps"``,
            as :attr:`difffeat.tracing.Trace.used_self_step` resolved it); None for ``aggregate="steps"``.
    """

    image: Image.Image
    result: SegmentationResult
    prompt: str
    seed: int
    guidance: str
    guidance_scale: float
    steps: int
    trace_steps: tuple[int, ...] | None = None
    aggregate: str = "maps"
    self_step: int | None = None


def generate_image(backbone: Any, prompt: str, classes: list[str] | None = None, *, guidance: str = "scfg-goca",
                   guidance_scale: float = 7.5, steps: int = 20, seed: int = 0, trace_steps: tuple[int, ...] | None = None,
                   resolution: int | None = None, aggregate: str = "maps", self_step: int | None = None,
                   **settings: Any) -> GeneratedImage:
    """Generate ``prompt``'s image with ``backbone``'s pipeline under :func:`difffeat.trace` and segment it.

    ``classes``: words of the prompt to segment (default :func:`prompt_class_words`); a word the prompt does not
    contain warns (:class:`~difffeat.tracing.ClassNotInPromptWarning`, naming the prompt's words), none in it
    is an error. ``guidance``: "cfg", "scfg-goca" or "scfg" (:class:`~difffeat.SCFG`; every mode needs
    ``guidance_scale`` > 1). The generator is seeded with ``seed``. ``trace_steps``: the denoising steps whose
    maps are averaged (default every step). ``aggregate`` ("maps" or "steps") and ``self_step``: how the traced
    steps combine, as in :func:`difffeat.trace`. ``settings``: :class:`~difffeat.segment.SegmentSettings` fields.
    Every option is checked before the pipeline runs."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidPromptError("empty prompt: describe the image to generate, e.g. \"a red circle and a blue star\"")
    scfg = SCFG(guidance_scale, guidance)
    check_number("steps", steps, 1, 1000, integer=True)
    check_number("seed", seed, 0, 2**63 - 1, integer=True)
    check_resolution("resolution", resolution)
    if trace_steps is not None and (not trace_steps or min(trace_steps) < 0 or max(trace_steps) >= steps):
        raise InvalidOptionError(f"trace steps {list(trace_steps)} are outside the schedule of {steps} steps (0..{steps - 1})")
    check_aggregate(aggregate, self_step, steps, tuple(trace_steps) if trace_steps else None)
    if classes is None:
        classes = prompt_class_words(prompt, backbone)
        if not classes:
            raise InvalidPromptError(_no_class_words(prompt))
    pipe = backbone.pipeline
    size = resolution or backbone.native_resolution
    tc = trace(pipe, prompt, list(classes), steps=list(trace_steps) if trace_steps else None, guidance=scfg,
               aggregate=aggregate, self_step=self_step, **settings)
    with tc:
        image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance_scale), height=size, width=size,
                     generator=torch.Generator().manual_seed(int(seed))).images[0]
    return GeneratedImage(image, tc.result(0, image), prompt, int(seed), guidance, float(guidance_scale), int(steps),
                          tuple(trace_steps) if trace_steps else None, aggregate, tc.used_self_step)


def _coco_dataset(out_dir: Path, items: list[PromptItem]) -> dict[str, Any]:
    """A COCO instances dict of the finished prompts: one image per prompt (file ``<id>.png``), one RLE
    annotation per class present in its label map, categories = every class (ids from 1, first seen first)."""
    from pycocotools import mask as mask_utils

    categories: dict[str, int] = {}
    for it in items:
        for c in it.classes:
            categories.setdefault(c, len(categories) + 1)
    images, annotations = [], []
    for image_id, it in enumerate(items, start=1):
        meta = segment_done(out_dir, it.id)
        if meta is None:
            continue
        labels = np.asarray(Image.open(out_dir / f"{it.id}_labels.png"))
        h, w = labels.shape
        images.append({"id": image_id, "file_name": f"{it.id}.png", "height": h, "width": w, "caption": it.prompt})
        for cls, label in meta["classes"].items():
            if cls == "background":
                continue
            binary = np.asfortranarray((labels == label).astype(np.uint8))
            if not binary.any():
                continue
            rle = mask_utils.encode(binary)
            area, bbox = float(mask_utils.area(rle)), [float(x) for x in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": categories[cls],
                                "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": c, "supercategory": "object"} for c, i in categories.items()]}


def run_generate(backbone: Any, items: list[PromptItem], job: GenerateJob, state=None, **settings: Any) -> RunSummary:
    """Generate every prompt's image with its label map into ``job.out_dir`` (see the module docstring).
    ``settings``: :class:`~difffeat.segment.SegmentSettings` fields of the traced maps."""
    out_dir = Path(job.out_dir)
    # the guidance and the aggregation are checked before the run folder is opened
    SCFG(job.guidance_scale, job.guidance)
    check_aggregate(job.aggregate, job.self_step, job.steps, job.trace_steps)
    run_settings = {"guidance": job.guidance, "guidance_scale": job.guidance_scale, "steps": job.steps,
                    "trace_steps": list(job.trace_steps) if job.trace_steps else None, "seed": job.seed,
                    "resolution": job.resolution, "aggregate": job.aggregate, "self_step": job.self_step,
                    "heatmaps": job.heatmaps, **settings}
    dataset = {"prompts": [[it.id, it.prompt, list(it.classes)] for it in items]}
    run = Run(Manifest("generate", str(backbone.name), run_settings, dataset), out_dir, state, job.overwrite,
              job.progress).open()
    todo, done = run.split(range(len(items)), lambda i: segment_done(out_dir, items[i].id))
    bar = run.bar(len(todo), "generate")
    for i in todo:
        it = items[i]
        out = generate_image(backbone, it.prompt, list(it.classes), guidance=job.guidance, guidance_scale=job.guidance_scale,
                             steps=job.steps, seed=job.seed + i, trace_steps=job.trace_steps, resolution=job.resolution,
                             aggregate=job.aggregate, self_step=job.self_step, **settings)
        write_bytes(out_dir / f"{it.id}.png", lambda tmp, im=out.image: im.save(tmp, format="PNG"))
        save_result(out.result, out.image, out_dir, it.id, heatmaps=job.heatmaps)  # .json last
        bar.update(1)
    bar.close()
    summary = run.finish(len(items), len(todo), len(done), "generate_summary.json")
    if run.is_main_process:
        write_json(out_dir / COCO_FILE, _coco_dataset(out_dir, items))
    run.state.wait_for_everyone()
    return summary
