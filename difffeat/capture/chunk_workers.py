"""Chunk workers: the observer's chunks of query rows spread over threads that each run torch's kernels on
one thread, so one observed attention call costs a handful of thread hand-offs instead of several OpenMP
parallel regions per chunk.

Why: every torch CPU op of a chunk (``q.k^T``, softmax, ``P V``, the head reduction, the copies) is its own
OpenMP parallel region, and each region ends at a barrier that waits for the slowest thread. On a quiet
machine that costs little; on shared cores (another process busy, a thread pre-empted) each barrier waits for
a scheduler time slice, and the observer's ~1,000 regions per SD1.5 self-attention call made it 4.6-22x the
fused SDPA kernel at 2 threads (one region per call; README, "Observer attention kernel"). Here each worker
takes the next chunk when it is free (dynamic scheduling: a worker sharing its core with another process
simply takes fewer chunks) and no barrier is crossed between chunks.

Each chunk runs the same single-threaded kernels whichever worker takes it, so results do not depend on the
scheduling. Workers are used only where that is safe and useful (:func:`chunk_workers`): CPU tensors, more
than one torch thread, more than one chunk, no autograd graph to record, no autocast. The workers' threads are
created once per process; creating them sets torch's process-wide thread count to 1 for a moment (torch has no
per-thread setting), which is restored before any work is handed out.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["chunk_workers", "run_chunks", "InRowOrder"]

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_PID = 0  # a forked child inherits the pool object but not its threads: it makes its own
_POOL_LOCK = threading.Lock()


def chunk_workers(*tensors: torch.Tensor) -> int:
    """How many worker threads an attention call over these tensors may use: torch's intra-op thread count
    for plain CPU tensors outside autograd and autocast, else 1 (the caller's thread, as before)."""
    n = torch.get_num_threads()
    if n <= 1:
        return 1
    for t in tensors:
        if type(t) is not torch.Tensor or isinstance(t, FakeTensor) or t.device.type != "cpu":
            return 1
        if t.requires_grad and torch.is_grad_enabled():
            return 1
    if torch.is_autocast_enabled("cpu"):
        return 1
    return n


class InRowOrder:
    """Lets chunks through one at a time in row order (``with turn(rows):``), whichever thread computed them:
    a reducer that keeps state across chunks (a running sum) then sees the chunks as the caller's thread would,
    so its result does not depend on the scheduling. Chunks are taken in row order and each worker finishes its
    chunk before taking another, so the chunk whose turn it is is always being computed: no deadlock."""

    def __init__(self) -> None:
        self._next = 0
        self._moved = threading.Condition()

    @contextmanager
    def __call__(self, rows: slice):
        with self._moved:
            self._moved.wait_for(lambda: self._next == rows.start)
        try:
            yield
        finally:
            with self._moved:
                self._next = rows.stop
                self._moved.notify_all()


def _single_threaded(ready: threading.Barrier) -> None:
    torch.set_num_threads(1)  # this thread's OpenMP and MKL settings (and, for a moment, the process default)
    ready.wait()


def _pool(n: int) -> ThreadPoolExecutor:
    """The process's chunk workers (at least ``n``), each running torch ops on one thread."""
    global _POOL, _POOL_SIZE, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < n or _POOL_PID != os.getpid():
            previous = torch.get_num_threads()
            ready = threading.Barrier(n + 1)
            pool = ThreadPoolExecutor(n, thread_name_prefix="difffeat-chunk", initializer=_single_threaded,
                                      initargs=(ready,))
            for _ in range(n):  # start every thread now: each runs its initializer once
                pool.submit(lambda: None)
            ready.wait()
            torch.set_num_threads(previous)  # the process default, for threads started later
            if _POOL is not None and _POOL_PID == os.getpid():
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE, _POOL_PID = pool, n, os.getpid()
        return _POOL


def run_chunks(chunk: Callable[[slice], None], n_rows: int, rows_per_chunk: int, workers: int) -> None:
    """Call ``chunk(rows)`` for consecutive slices of ``rows_per_chunk`` rows covering ``range(n_rows)``: in
    the caller's thread when ``workers`` is 1, else on ``workers`` chunk workers, each taking the next slice
    when it is free, under the caller's inference and grad modes. The first exception stops the remaining
    chunks and is raised here."""
    starts = range(0, n_rows, rows_per_chunk)
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            chunk(slice(start, min(n_rows, start + rows_per_chunk)))
        return
    order = iter(starts)
    take = threading.Lock()
    failed = threading.Event()
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def work() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while not failed.is_set():
                with take:
                    start = next(order, None)
                if start is None:
                    return
                try:
                    chunk(slice(start, min(n_rows, start + rows_per_chunk)))
                except BaseException:
                    failed.set()
                    raise

    n = min(workers, len(starts))
    pool = _pool(n)
    futures = [pool.submit(work) for _ in range(n)]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
