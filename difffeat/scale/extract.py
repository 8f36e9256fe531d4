"""Dataset-scale feature extraction: sharded over processes, resumable, atomic per-image files.

Each process takes every N-th image, skips those whose output already exists, loads completely and was
made with the same settings, decodes/resizes ahead of the model in DataLoader workers, and writes
``out/<stem>.safetensors`` (one ``[C, H, W]`` tensor per feature name) atomically.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..features import FeatureExtractor
from ..io import save_features, write_json
from .data import ImageRef, LoadFailure, ResizedImages, check_unique_stems, image_loader, to_pil
from .manifest import Manifest, check_manifest, write_manifest
from .state import gather_list, init_state, reduce_max, reduce_sum, shard

#: file in the output folder listing the images a ``skip_unreadable`` run could not read
UNREADABLE = "unreadable.json"

__all__ = ["UNREADABLE", "ExtractJob", "ExtractSummary", "run_extract", "feature_file_ok", "remove_stale_parts"]


@dataclass
class ExtractJob:
    """Options of an extraction run (what does not change the features)."""

    out_dir: Path
    prompt: str = ""
    num_workers: int = 2
    overwrite: bool = False
    progress: bool = True
    dataset: dict[str, Any] = field(default_factory=dict)  # description stored in the manifest
    skip_unreadable: bool = False  # list unusable images in out_dir/unreadable.json instead of stopping


@dataclass
class ExtractSummary:
    total: int
    written: int
    skipped: int
    processes: int
    seconds: float
    unreadable: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "items_per_second": self.written / self.seconds if self.seconds > 0 else None}


def _header(path: Path) -> dict[str, Any] | None:
    """The safetensors header if the file is complete (size matches what the header declares), else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return header if 8 + n + end == size else None


def feature_file_ok(path: Path, names: list[str], expected_meta: dict[str, str]) -> bool:
    """True if ``path`` is a complete feature file holding ``names`` with the ``expected_meta`` entries."""
    header = _header(path)
    if header is None or any(n not in header for n in names):
        return False
    meta = header.get("__metadata__", {})
    return all(meta.get(k) == v for k, v in expected_meta.items())


def remove_stale_parts(folder: Path) -> int:
    """Delete temporary ``.*.part`` files left by a killed run (call before any process writes)."""
    n = 0
    for p in folder.glob(".*.part"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def _encoded(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def run_extract(fx: FeatureExtractor, refs: list[ImageRef], job: ExtractJob, state=None) -> ExtractSummary:
    """Extract features of ``refs`` into ``job.out_dir`` on every process of the current launch.

    Call on every process (the same arguments); returns the same summary everywhere.
    """
    state = state or init_state()
    out_dir = Path(job.out_dir)
    check_unique_stems(refs)
    settings = fx.settings()
    manifest = Manifest("extract", settings["model"], {**settings, "prompt": job.prompt}, job.dataset)
    check_manifest(out_dir, manifest, job.overwrite)  # every process: all raise alike, none hangs
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(out_dir)
        write_manifest(out_dir, manifest)
    state.wait_for_everyone()

    meta = {**settings, "prompt": job.prompt}
    expected = _encoded(meta)
    mine = shard(range(len(refs)), state.process_index, state.num_processes)
    todo = [i for i in mine if job.overwrite or not feature_file_ok(out_dir / f"{refs[i].stem}.safetensors", fx.names, expected)]
    skipped = len(mine) - len(todo)

    data = ResizedImages([refs[i] for i in todo], fx.resolution, fx.backbone.size_multiple, fx.square)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"extract (process 0 of {state.num_processes})", unit="img",
               disable=not (job.progress and state.is_main_process), smoothing=0.1)
    start = time.perf_counter()
    pending: deque[Future] = deque()
    unreadable: list[dict[str, str]] = []
    with ThreadPoolExecutor(max_workers=1) as writer:
        for batch in image_loader(data, fx.batch_size, job.num_workers):
            by_size: dict[tuple, list] = {}
            for pos, arr in batch:  # normally one group; two only if a header lied about the size
                if isinstance(arr, LoadFailure):
                    if not job.skip_unreadable:
                        raise arr.error(f"To skip such images and list them in {out_dir / UNREADABLE}, "
                                        "pass --skip-unreadable (skip_unreadable=True).")
                    unreadable.append({"path": refs[todo[pos]].path, "error": arr.message})
                    continue
                by_size.setdefault(arr.shape, []).append((pos, arr))
            for group in by_size.values():
                feats = fx.extract_batch([to_pil(a) for _, a in group], [job.prompt] * len(group))
                for j, (pos, _) in enumerate(group):
                    ref = refs[todo[pos]]
                    item = {k: v[j].clone() for k, v in feats.items()}
                    pending.append(writer.submit(save_features, out_dir / f"{ref.stem}.safetensors", item,
                                                 {**meta, "image": ref.path}))
                while len(pending) > 4 * fx.batch_size:
                    pending.popleft().result()
            bar.update(len(batch))
        for f in pending:
            f.result()
    bar.close()
    seconds = time.perf_counter() - start

    counts = reduce_sum(state, torch.tensor([len(todo) - len(unreadable), skipped], dtype=torch.int64))
    wall = float(reduce_max(state, torch.tensor([seconds], dtype=torch.float64))[0])
    failed = gather_list(state, unreadable)
    summary = ExtractSummary(len(refs), int(counts[0]), int(counts[1]), state.num_processes, wall, len(failed))
    if state.is_main_process:
        if failed:
            write_json(out_dir / UNREADABLE, sorted(failed, key=lambda d: d["path"]))
        else:
            (out_dir / UNREADABLE).unlink(missing_ok=True)  # from an earlier run whose failures are now fixed
        write_json(out_dir / "extract_summary.json", summary.to_json())
    state.wait_for_everyone()
    return summary
