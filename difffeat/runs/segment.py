"""Dataset-scale segmentation: sharded over processes, resumable, atomic per-image outputs.

Each process takes every N-th image, skips those a previous run finished (``<stem>.json`` is written last,
after the PNGs, so its presence marks an image done), decodes ahead of the model in DataLoader workers,
segments ``batch_size`` images per forward (:func:`~difffeat.evaluate.runner.segment_prompts`) and writes ``<stem>_labels.png``, ``<stem>_overlay.png`` (and heat maps) and ``<stem>.json`` each atomically.
COCO results, when asked for, are assembled by the main process from the finished images at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..evaluate.datasets import EvalItem
from ..evaluate.label_sources import ImageFiles, label_source
from ..evaluate.runner import segment_prompts
from ..checks import check_batch_size
from ..io import write_json
from ..segment.outputs import coco_entries, save_result
from ..segment.segmenter import Segmenter
from .engine import UNREADABLE, Run, RunSummary
from .manifest import Manifest
from .sources import ImageRef, LoadFailure, check_unique_stems, decoded_loader


@dataclass
class SegmentJob:
    """Options of a segmentation run (besides the segmenter's own settings)."""

    out_dir: Path
    classes: list[str]
    heatmaps: bool = False
    coco_results: Path | None = None
    num_workers: int = 2
    overwrite: bool = False
    progress: bool = True
    skip_unreadable: bool = False
    dataset: dict[str, Any] = field(default_factory=dict)
    #: where each image's prompt comes from: "all" (every class), "labels=FILE", "captions=FILE;all" ...
    #: (:mod:`difffeat.evaluate.label_sources`)
    label_source: str = "all"
    #: images per forward (images of one size share it; outputs equal batch 1's, so it is not a setting of the run)
    batch_size: int = 1


def segment_done(out_dir: Path, stem: str) -> dict[str, Any] | None:
    """The ``<stem>.json`` of a finished image (its PNGs present), or None."""
    try:
        meta = json.loads((out_dir / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    if not all((out_dir / f"{stem}_{k}.png").is_file() for k in ("labels", "overlay")):
        return None
    return meta


def _coco_results(out_dir: Path, refs: list[ImageRef]) -> list[dict[str, Any]]:
    """COCO results of every finished image; category id i = the i-th class as segmented (class words as
    normalised by the segmenter, e.g. 'Crosses' -> 'cross', so none is dropped)."""
    entries: list[dict[str, Any]] = []
    for image_id, ref in enumerate(refs, start=1):
        meta = segment_done(out_dir, ref.stem)
        if meta is None:  # unreadable and skipped
            continue
        labels = np.asarray(Image.open(out_dir / f"{ref.stem}_labels.png"))
        index = {c: i for c, i in meta["classes"].items() if c != "background"}
        entries += coco_entries(labels, index, meta["class_scores"], image_id, index)
    return entries


def run_segment(segmenter: Segmenter, refs: list[ImageRef], job: SegmentJob, state=None) -> RunSummary:
    """Segment ``refs`` into ``job.classes`` on every process of the current launch (same summary everywhere),
    ``job.batch_size`` images per forward."""
    check_batch_size(job.batch_size)
    out_dir = Path(job.out_dir)
    check_unique_stems(refs)
    source = label_source(job.label_source)
    source.check(ImageFiles([r.path for r in refs], job.classes))  # a bad label/caption file: before any forward
    settings = {**segmenter.settings.to_dict(results_only=True), "classes": list(job.classes), "heatmaps": job.heatmaps,
                "label_source": source.spec}
    run = Run(Manifest("segment", str(segmenter.backbone.name), settings, job.dataset), out_dir, state,
              job.overwrite, job.progress).open()
    todo, done = run.split(range(len(refs)), lambda i: segment_done(out_dir, refs[i].stem))
    bar = run.bar(len(todo), "segment")
    batch: list[tuple[ImageRef, Any]] = []  # (ref, image) decoded and waiting for a forward

    def flush() -> None:
        items = [EvalItem(Path(ref.path).name, image, None) for ref, image in batch]
        prompts = [source.prompt(item, job.classes) for item in items]
        results = segment_prompts(segmenter, [image for _, image in batch], job.classes, prompts, job.batch_size)
        for (ref, image), result in zip(batch, results):
            if result is not None:  # a label file may name no class for an image: nothing to write
                save_result(result, image, out_dir, ref.stem, heatmaps=job.heatmaps)  # each file atomic, .json last
        bar.update(len(batch))
        batch.clear()

    for pos, image in decoded_loader([refs[i] for i in todo], job.num_workers):
        ref = refs[todo[pos]]
        if isinstance(image, LoadFailure):
            if not job.skip_unreadable:
                raise image.error(f"To skip such images and list them in {out_dir / UNREADABLE}, pass --skip-unreadable.")
            run.skip_unreadable(ref.path, image.message)
            bar.update(1)
            continue
        batch.append((ref, image))
        if len(batch) == job.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    summary = run.finish(len(refs), len(todo) - len(run.unreadable), len(done), "segment_summary.json")
    if job.coco_results and run.is_main_process:
        write_json(job.coco_results, _coco_results(out_dir, refs))
    run.state.wait_for_everyone()
    return summary
