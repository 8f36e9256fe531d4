"""Dataset-scale feature extraction: sharded over processes, resumable, atomic per-image files.

Each process takes every N-th image, skips those whose output already exists, loads completely and was
made with the same settings, decodes/resizes ahead of the model in DataLoader workers, and writes
``out/<stem>.safetensors`` (one ``[C, H, W]`` tensor per feature name) atomically.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..features import FeatureExtractor
from ..io import save_features
from .engine import UNREADABLE, Run, RunSummary
from .manifest import Manifest
from .sources import ImageRef, LoadFailure, ResizedImages, check_unique_stems, image_loader, to_pil

#: what an extraction run reports (the engine's summary)
ExtractSummary = RunSummary


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


def _encoded(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def run_extract(fx: FeatureExtractor, refs: list[ImageRef], job: ExtractJob, state=None) -> RunSummary:
    """Extract features of ``refs`` into ``job.out_dir`` on every process of the current launch.

    Call on every process (the same arguments); returns the same summary everywhere.
    """
    out_dir = Path(job.out_dir)
    check_unique_stems(refs)
    meta = {**fx.settings(), "prompt": job.prompt}
    run = Run(Manifest("extract", meta["model"], meta, job.dataset), out_dir, state, job.overwrite, job.progress).open()
    expected = _encoded(meta)
    todo, done = run.split(range(len(refs)), lambda i: feature_file_ok(out_dir / f"{refs[i].stem}.safetensors", fx.names, expected) or None)

    data = ResizedImages([refs[i] for i in todo], fx.resolution, fx.backbone.size_multiple, fx.square)
    bar = run.bar(len(todo), "extract")
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1) as writer:
        for batch in image_loader(data, fx.batch_size, job.num_workers):
            by_size: dict[tuple, list] = {}
            for pos, arr in batch:  # normally one group; two only if a header lied about the size
                if isinstance(arr, LoadFailure):
                    if not job.skip_unreadable:
                        raise arr.error(f"To skip such images and list them in {out_dir / UNREADABLE}, "
                                        "pass --skip-unreadable (skip_unreadable=True).")
                    run.skip_unreadable(refs[todo[pos]].path, arr.message)
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
    return run.finish(len(refs), len(todo) - len(run.unreadable), len(done), "extract_summary.json")
