"""Dataset-scale segmentation evaluation: sharded, resumable, reduced to one confusion matrix.

The dataset is cut into fixed chunks of ``chunk_size`` consecutive images (independent of the number of
processes); process r takes chunks r, r + N, ... After each chunk it writes ``out/parts/part-<a>-<b>.npz``
(that chunk's confusion counts) atomically, so a restart skips finished chunks. At the end each process sums
its chunks, the sums are reduced across processes, and the main process writes the report. Integer counts
make the result identical for any number of processes.
"""

from __future__ import annotations

import hashlib
import zipfile
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluate.metrics import ConfusionMatrix
from ..evaluate.runner import EvalReport, add_at_every_tau, build_report, to_dataset_labels, best_tau, segment_item, tau_grid_report
from ..evaluate.label_sources import label_source
from ..io import write_bytes, write_json
from ..segment.segmenter import Segmenter
from .data import LoadFailure, eval_loader
from .extract import remove_stale_parts
from .manifest import Manifest, check_manifest, write_manifest
from .state import init_state, reduce_max, reduce_sum, shard

__all__ = ["EvalJob", "run_eval", "tune_tau_distributed", "chunks_of"]


@dataclass
class EvalJob:
    """Options of an evaluation run."""

    out_dir: Path
    setting: str = "oracle"
    limit: int | None = None
    chunk_size: int = 8
    num_workers: int = 2
    overwrite: bool = False
    progress: bool = True
    dataset: dict[str, Any] = field(default_factory=dict)
    #: also count mIoU at each of these taus on the evaluated split (as the published code prints it)
    tau_grid: tuple[float, ...] = ()


def chunks_of(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``size`` consecutive items covering ``range(n)``."""
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _fingerprint(manifest: Manifest) -> str:
    d = manifest.to_json()
    d.pop("versions")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _load_part(path: Path, num_classes: int, fingerprint: str, n_grid: int = 0) -> tuple[np.ndarray, int, np.ndarray] | None:
    """A finished chunk's ``(counts, n_images, grid counts [n_grid, k, k])``, or None if missing, unreadable
    or from other settings."""
    try:
        with np.load(path) as z:
            if str(z["fingerprint"]) != fingerprint or z["counts"].shape != (num_classes, num_classes):
                return None
            grid = z["grid_counts"].astype(np.int64) if n_grid else np.zeros((0, num_classes, num_classes), np.int64)
            if grid.shape[0] != n_grid:
                return None
            return z["counts"].astype(np.int64), int(z["n_images"]), grid
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _save_part(path: Path, counts: np.ndarray, n_images: int, fingerprint: str, grid: np.ndarray | None = None) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            extra = {"grid_counts": grid} if grid is not None and len(grid) else {}
            np.savez(f, counts=counts, n_images=np.int64(n_images), fingerprint=np.str_(fingerprint), **extra)

    write_bytes(path, write)


def _part_path(parts: Path, start: int, stop: int) -> Path:
    return parts / f"part-{start:08d}-{stop:08d}.npz"


def run_eval(segmenter: Segmenter, dataset, job: EvalJob, state=None, extra_manifest: dict | None = None) -> EvalReport:
    """Evaluate ``segmenter`` on ``dataset`` on every process of the current launch; every process returns
    the same report (confusion matrix in ``report.extra["confusion_matrix"]``)."""
    state = state or init_state()
    out_dir = Path(job.out_dir)
    parts = out_dir / "parts"
    classes = list(dataset.classes)
    n = len(dataset) if job.limit is None else min(job.limit, len(dataset))
    label_source(job.setting).check(dataset, n)  # a bad label/caption file fails here, before any forward
    settings = {**segmenter.settings.to_dict(), "setting": str(job.setting), **(extra_manifest or {})}
    if job.tau_grid:
        settings["tau_grid"] = [float(t) for t in job.tau_grid]
    manifest = Manifest("eval", str(segmenter.backbone.name), settings, {**job.dataset, "n": n, "classes": classes})
    fingerprint = _fingerprint(manifest)
    check_manifest(out_dir, manifest, job.overwrite)
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(parts)
        write_manifest(out_dir, manifest)
    state.wait_for_everyone()

    k = len(classes) + 1
    taus = tuple(float(t) for t in job.tau_grid)
    total = np.zeros((k, k), np.int64)
    grid_total = np.zeros((len(taus), k, k), np.int64)
    images = 0
    todo: list[tuple[int, int]] = []
    for start, stop in shard(chunks_of(n, job.chunk_size), state.process_index, state.num_processes):
        done = None if job.overwrite else _load_part(_part_path(parts, start, stop), k, fingerprint, len(taus))
        if done is None:
            todo.append((start, stop))
        else:
            total += done[0]
            images += done[1]
            grid_total += done[2]

    from tqdm.auto import tqdm

    indices = [i for a, b in todo for i in range(a, b)]
    bar = tqdm(total=len(indices), desc=f"eval {job.setting} (process 0 of {state.num_processes})", unit="img",
               disable=not (job.progress and state.is_main_process), smoothing=0.1)
    t0 = time.perf_counter()
    loader = iter(eval_loader(dataset, indices, job.num_workers))
    for start, stop in todo:
        cm = ConfusionMatrix(k)
        grid = {t: ConfusionMatrix(k) for t in taus}
        for _ in range(start, stop):
            i, item = next(loader)
            if isinstance(item, LoadFailure):
                raise item.error()
            result, labels = segment_item(segmenter, item, classes, job.setting)
            cm.update(item.gt, to_dataset_labels(result, labels, item.gt.shape))
            add_at_every_tau(grid, result, labels, item.gt)
            bar.update(1)
        grid_counts = np.stack([c.counts for c in grid.values()]) if taus else None
        _save_part(_part_path(parts, start, stop), cm.counts, stop - start, fingerprint, grid_counts)
        total += cm.counts
        images += stop - start
        if taus:
            grid_total += grid_counts
    bar.close()
    seconds = time.perf_counter() - t0

    summed = reduce_sum(state, torch.from_numpy(np.concatenate([total.ravel(), grid_total.ravel(), [images]])))
    wall = float(reduce_max(state, torch.tensor([seconds], dtype=torch.float64))[0])
    cm = ConfusionMatrix(k, summed[: k * k].numpy().reshape(k, k).astype(np.int64))
    report = build_report(cm, classes, str(job.setting), int(summed[-1]), wall, segmenter.settings.to_dict())
    if taus:
        grid_cms = summed[k * k : -1].numpy().reshape(len(taus), k, k).astype(np.int64)
        report.extra["evaluated_split_tau_grid"] = tau_grid_report({t: ConfusionMatrix(k, c) for t, c in zip(taus, grid_cms)})
    report.extra["confusion_matrix"] = cm.counts.tolist()
    report.extra["processes"] = state.num_processes
    report.extra["run_folder"] = str(out_dir)
    report.extra["dataset"] = dict(job.dataset)  # incl. "void": what 255 pixels counted as
    return report


def tune_tau_distributed(segmenter: Segmenter, dataset, setting: str, n: int, state=None, progress: bool = False,
                         taus=tuple(np.round(np.linspace(-0.4, 0.4, 17), 3)), num_workers: int = 0) -> tuple[float, dict[float, float]]:
    """:func:`difffeat.evaluate.tune_tau` with the tuning images shared among processes (same answer)."""
    from tqdm.auto import tqdm

    state = state or init_state()
    classes = list(dataset.classes)
    k = len(classes) + 1
    cms = {float(t): ConfusionMatrix(k) for t in taus}
    label_source(setting).check(dataset, n)
    mine = shard(range(min(n, len(dataset))), state.process_index, state.num_processes)
    for i, item in tqdm(eval_loader(dataset, mine, num_workers), total=len(mine), desc="tune tau", unit="img",
                        disable=not (progress and state.is_main_process)):
        if isinstance(item, LoadFailure):
            raise item.error()
        result, labels = segment_item(segmenter, item, classes, setting)
        add_at_every_tau(cms, result, labels, item.gt)
    stacked = reduce_sum(state, torch.from_numpy(np.stack([cm.counts for cm in cms.values()])))
    scores = {t: ConfusionMatrix(k, c.numpy()).miou() for t, c in zip(cms, stacked)}
    return best_tau(scores), scores


def write_report(path: Path, report: EvalReport, state) -> None:
    """Main process only: the JSON report."""
    if state.is_main_process:
        write_json(path, report.to_json())
