"""The one evaluation loop: sharded, resumable, reduced to confusion matrices; evaluation and tau tuning use it.

The dataset is cut into fixed chunks of ``chunk_size`` consecutive images (independent of the number of
processes); the engine (:class:`~difffeat.runs.engine.Run`) gives process r chunks r, r + N, ... After each
chunk the loop writes ``out/parts/part-<a>-<b>.npz`` (that chunk's confusion counts at every tau asked for)
atomically, so a restart skips finished chunks. The counts are summed across processes; integer counts make
the result identical for any number of processes. Without an output folder the same loop runs in memory.

* :func:`run_eval` / :func:`evaluate`: the segmenter's own decision (one matrix).
* :func:`tune_tau`: every tau of a grid decided from the same maps (one forward per image), best mIoU wins.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluate.metrics import ConfusionMatrix
from ..evaluate.label_sources import label_source
from ..evaluate.runner import TAU_GRID, EvalReport, add_at_every_tau, best_tau, build_report, segment_items, tau_grid_report, to_dataset_labels
from ..checks import check_batch_size
from ..errors import InvalidOptionError
from ..io import write_bytes
from ..segment.segmenter import Segmenter
from .engine import Run
from .manifest import Manifest
from .sources import LoadFailure, eval_loader


@dataclass
class EvalJob:
    """Options of an evaluation run; ``out_dir=None`` keeps everything in memory (no resuming)."""

    out_dir: Path | None = None
    setting: str = "oracle"
    limit: int | None = None
    chunk_size: int = 8
    num_workers: int = 2
    overwrite: bool = False
    progress: bool = True
    dataset: dict[str, Any] = field(default_factory=dict)
    #: also count mIoU at each of these taus on the evaluated split (as the published code prints it)
    tau_grid: tuple[float, ...] = ()
    #: images per forward, within a chunk (so at most ``chunk_size``); the counts equal batch 1's, so it is
    #: not a setting of the run and a resumed run may use another
    batch_size: int = 1
    #: how the report's mIoU averages the classes: "present" or "published" (see ``ConfusionMatrix.miou``)
    miou_average: str = "present"


def chunks_of(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``size`` consecutive items covering ``range(n)``."""
    if size < 1:
        raise InvalidOptionError(f"chunk_size must be >= 1, got {size}")
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _load_part(path: Path, shape: tuple[int, ...], fingerprint: str) -> tuple[np.ndarray, int] | None:
    """A finished chunk's ``(counts, n_images)``, or None if missing, unreadable or from other settings."""
    try:
        with np.load(path) as z:
            if str(z["fingerprint"]) != fingerprint or z["counts"].shape != shape:
                return None
            return z["counts"].astype(np.int64), int(z["n_images"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _save_part(path: Path, counts: np.ndarray, n_images: int, fingerprint: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, counts=counts, n_images=np.int64(n_images), fingerprint=np.str_(fingerprint))

    write_bytes(path, write)


def _confusion_counts(segmenter: Segmenter, dataset, job: EvalJob, taus: Sequence[float] | None, kind: str,
                      state=None, extra_settings: dict | None = None) -> tuple[np.ndarray, int, Run]:
    """Confusion counts ``[T, K, K]`` summed over the dataset and over processes (T = len(taus), or 1 for
    the segmenter's own decision when ``taus`` is None, then ``job.tau_grid``), and the number of images."""
    if job.limit is not None and job.limit < 1:
        raise InvalidOptionError(f"limit must be >= 1 image, got {job.limit}")
    check_batch_size(job.batch_size, job.chunk_size)
    classes = list(dataset.classes)
    n = len(dataset) if job.limit is None else min(job.limit, len(dataset))
    if n < 1:
        raise InvalidOptionError("the dataset has no images to evaluate")
    label_source(job.setting).check(dataset, n)  # unknown setting, bad label/caption file: before any forward
    grid = tuple(float(t) for t in job.tau_grid) if taus is None else ()
    settings = {**segmenter.settings.to_dict(results_only=True), "setting": str(job.setting), **(extra_settings or {})}
    if taus is not None:
        settings["taus"] = [float(t) for t in taus]
    if grid:
        settings["tau_grid"] = list(grid)
    manifest = Manifest(kind, str(segmenter.backbone.name), settings, {**job.dataset, "n": n, "classes": classes})
    run = Run(manifest, job.out_dir, state, job.overwrite, job.progress).open()
    fingerprint = run.fingerprint()
    parts = run.out_dir / "parts" if run.stored else None
    k = len(classes) + 1
    shape = (1 + len(grid) if taus is None else len(taus), k, k)

    def part(chunk: tuple[int, int]) -> Path:
        return parts / f"part-{chunk[0]:08d}-{chunk[1]:08d}.npz"

    todo, done = run.split(chunks_of(n, job.chunk_size), lambda c: _load_part(part(c), shape, fingerprint))
    total = sum((counts for _, (counts, _) in done), np.zeros(shape, np.int64))
    images = sum(m for _, (_, m) in done)
    if parts is not None and run.is_main_process:
        parts.mkdir(exist_ok=True)
    run.state.wait_for_everyone()

    bar = run.bar(sum(b - a for a, b in todo), f"{kind} {label_source(job.setting).spec.split('=')[0]}")
    loader = iter(eval_loader(dataset, [i for a, b in todo for i in range(a, b)], job.num_workers))
    for start, stop in todo:
        cms = {t: ConfusionMatrix(k) for t in (taus if taus is not None else [None])}
        grid_cms = {t: ConfusionMatrix(k) for t in grid}
        for first in range(start, stop, job.batch_size):
            items = []
            for _ in range(first, min(first + job.batch_size, stop)):
                _, item = next(loader)
                if isinstance(item, LoadFailure):
                    raise item.error()
                items.append(item)
            for item, (result, labels) in zip(items, segment_items(segmenter, items, classes, job.setting, job.batch_size)):
                if taus is None:
                    cms[None].update(item.gt, to_dataset_labels(result, labels, item.gt.shape))
                    add_at_every_tau(grid_cms, result, labels, item.gt)
                else:
                    add_at_every_tau(cms, result, labels, item.gt)
            bar.update(len(items))
        counts = np.stack([cm.counts for cm in [*cms.values(), *grid_cms.values()]])
        if parts is not None:
            _save_part(part((start, stop)), counts, stop - start, fingerprint)
        total += counts
        images += stop - start
    bar.close()
    summed = run.sum(torch.from_numpy(np.append(total.ravel(), images)))
    return summed[:-1].numpy().reshape(shape).astype(np.int64), int(summed[-1]), run


def run_eval(segmenter: Segmenter, dataset, job: EvalJob, state=None, extra_manifest: dict | None = None) -> EvalReport:
    """Evaluate ``segmenter`` on ``dataset`` on every process of the current launch; every process returns
    the same report (confusion matrix in ``report.extra["confusion_matrix"]``)."""
    counts, images, run = _confusion_counts(segmenter, dataset, job, None, "eval", state, extra_manifest)
    summary = run.finish(images, images, 0)
    cm = ConfusionMatrix(counts.shape[-1], counts[0])
    report = build_report(cm, list(dataset.classes), str(job.setting), images, summary.seconds, segmenter.settings.to_dict(),
                          job.miou_average)
    report.extra["confusion_matrix"] = cm.counts.tolist()
    if job.tau_grid:
        k = counts.shape[-1]
        report.extra["evaluated_split_tau_grid"] = tau_grid_report({float(t): ConfusionMatrix(k, c) for t, c in zip(job.tau_grid, counts[1:])},
                                                                      job.miou_average)
    report.extra["dataset"] = dict(job.dataset)  # incl. "void": what 255 pixels counted as
    report.extra["processes"] = summary.processes
    if run.stored:
        report.extra["run_folder"] = str(run.out_dir)
    return report


def evaluate(segmenter: Segmenter, dataset, setting: str = "oracle", limit: int | None = None, progress: bool = False,
             out_dir: str | Path | None = None, num_workers: int = 0, state=None, batch_size: int = 1,
             miou_average: str = "present") -> EvalReport:
    """Accumulate a confusion matrix over the dataset (background = class 0) and report mIoU (in memory
    unless ``out_dir`` is given; then resumable), ``batch_size`` images per forward; ``miou_average``:
    "present" or "published" (:meth:`ConfusionMatrix.miou`). ``setting`` may be a label source's spec or
    the source itself (e.g. :class:`~difffeat.evaluate.benchmarks.BenchmarkCaptions` for a benchmark)."""
    job = EvalJob(Path(out_dir) if out_dir else None, setting=getattr(setting, "spec", setting), limit=limit, num_workers=num_workers,
                  progress=progress, chunk_size=max(8, batch_size), batch_size=batch_size, miou_average=miou_average)
    return run_eval(segmenter, dataset, job, state)


def tune_tau(segmenter: Segmenter, dataset, setting: str = "oracle", taus: Sequence[float] = TAU_GRID,
             limit: int | None = None, progress: bool = False, out_dir: str | Path | None = None,
             num_workers: int = 0, state=None, batch_size: int = 1) -> tuple[float, dict[float, float]]:
    """Choose tau by mIoU on a tuning split: one forward per image, every tau decided from the same maps; the
    images are shared among processes (same answer as one process). Returns ``(best tau, {tau: mIoU})``."""
    taus = [float(t) for t in taus]
    if not taus or any(not np.isfinite(t) for t in taus):
        raise InvalidOptionError(f"tau grid must be a non-empty list of finite numbers, got {taus}")
    job = EvalJob(Path(out_dir) if out_dir else None, setting=setting, limit=limit, num_workers=num_workers, progress=progress,
                  chunk_size=max(8, batch_size), batch_size=batch_size)
    counts, _, run = _confusion_counts(segmenter, dataset, job, taus, "tune-tau", state)
    run.finish(0, 0, 0)
    scores = {t: ConfusionMatrix(counts.shape[-1], c).miou() for t, c in zip(taus, counts)}
    return best_tau(scores), scores
