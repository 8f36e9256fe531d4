"""The run engine every dataset loop uses: one output folder, sharding over processes, resumable units.

A :class:`Run` is one pass over a list of *units* (images for extract and segment, chunks of images for eval)
on every process of the current launch (a plain process is a world of one):

1. :meth:`Run.open` checks ``manifest.json`` against the run's settings on every process (all raise alike,
   none hangs), then the main process creates the folder, removes temporaries a killed run left and writes
   the manifest;
2. :meth:`Run.split` gives this process its shard (every N-th unit) minus the units a previous run finished;
3. the user's loop writes each unit's outputs atomically (:func:`difffeat.io.atomic_path`), so a unit is
   either finished or absent;
4. :meth:`Run.finish` sums the counts over processes, gathers the unreadable inputs and returns one
   :class:`RunSummary` on every process.

With ``out_dir=None`` nothing is stored: the same loop runs in memory (the Python API's ``evaluate``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..io import write_json
from .manifest import Manifest, check_manifest, write_manifest
from .processes import gather_list, init_state, reduce_max, reduce_sum, shard

U = TypeVar("U")
R = TypeVar("R")

#: file in the output folder listing the inputs a ``skip_unreadable`` run could not read
UNREADABLE = "unreadable.json"


@dataclass
class RunSummary:
    """What one run did, summed over processes."""

    total: int
    written: int
    skipped: int
    processes: int
    seconds: float
    unreadable: int = 0
    main_process: bool = True  # whether this process is the one that reports

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "main_process"}
        return {**d, "items_per_second": self.written / self.seconds if self.seconds > 0 else None}


def remove_stale_parts(folder: Path) -> int:
    """Delete temporary ``.*.part`` files left by a killed run (call before any process writes)."""
    n = 0
    for p in folder.glob(".*.part"):
        p.unlink(missing_ok=True)
        n += 1
    return n


class Run:
    """One sharded, resumable pass over units (see the module docstring)."""

    def __init__(self, manifest: Manifest, out_dir: str | Path | None, state=None, overwrite: bool = False,
                 progress: bool = True) -> None:
        self.manifest, self.overwrite, self.progress = manifest, overwrite, progress
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state = state or init_state()
        self.unreadable: list[dict[str, str]] = []
        self._start = time.perf_counter()

    @property
    def stored(self) -> bool:
        return self.out_dir is not None

    @property
    def is_main_process(self) -> bool:
        return self.state.is_main_process

    def fingerprint(self) -> str:
        """A short hash of what determines the outputs (manifest without versions), stored in unit files."""
        d = self.manifest.to_json()
        d.pop("versions")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def open(self) -> "Run":
        """Guard and prepare the output folder (every process calls it)."""
        if self.out_dir is not None:
            check_manifest(self.out_dir, self.manifest, self.overwrite)
            if self.state.is_main_process:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                for folder in [self.out_dir, *(p for p in self.out_dir.iterdir() if p.is_dir())]:
                    remove_stale_parts(folder)
                write_manifest(self.out_dir, self.manifest)
            self.state.wait_for_everyone()
        self._start = time.perf_counter()
        return self

    def split(self, units: Sequence[U], finished: Callable[[U], R | None]) -> tuple[list[U], list[tuple[U, R]]]:
        """This process's shard as ``(to do, [(unit, finished value), ...])``; ``finished(unit)`` returns what a
        previous run stored for the unit (anything but None), or None when it must be (re)done."""
        todo, done = [], []
        for unit in shard(units, self.state.process_index, self.state.num_processes):
            value = None if self.overwrite or self.out_dir is None else finished(unit)
            (todo.append(unit) if value is None else done.append((unit, value)))
        return todo, done

    def bar(self, total: int, what: str):
        """A progress bar shown by the main process only."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{what} (process 0 of {self.state.num_processes})", unit="img",
                    disable=not (self.progress and self.state.is_main_process), smoothing=0.1)

    def skip_unreadable(self, path: str, message: str) -> None:
        """Record an input that could not be read (listed in ``UNREADABLE`` by :meth:`finish`)."""
        self.unreadable.append({"path": path, "error": message})

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes."""
        return reduce_sum(self.state, tensor)

    def finish(self, total: int, written: int, skipped: int, summary_file: str | None = None) -> RunSummary:
        """Reduce this process's counts into one :class:`RunSummary` (every process gets it); the main process
        writes ``UNREADABLE`` (or removes an old one) and ``summary_file`` when the run is stored."""
        seconds = time.perf_counter() - self._start
        counts = self.sum(torch.tensor([written, skipped], dtype=torch.int64))
        wall = float(reduce_max(self.state, torch.tensor([seconds], dtype=torch.float64))[0])
        failed = gather_list(self.state, self.unreadable)
        summary = RunSummary(total, int(counts[0]), int(counts[1]), self.state.num_processes, wall, len(failed),
                             self.state.is_main_process)
        if self.out_dir is not None and self.state.is_main_process:
            if failed:
                write_json(self.out_dir / UNREADABLE, sorted(failed, key=lambda d: d["path"]))
            else:
                (self.out_dir / UNREADABLE).unlink(missing_ok=True)  # from an earlier run whose failures are fixed
            if summary_file:
                write_json(self.out_dir / summary_file, summary.to_json())
        self.state.wait_for_everyone()
        return summary
