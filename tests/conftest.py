"""Shared fixtures. Every test runs offline on tiny random models (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread by default: the tiny test models are overhead-bound, and two threads per process
# oversubscribe a busy 2-core machine badly (measured: full suite 946 s at 2 threads vs 162 s at 1 on a loaded
# box). DIFFFEAT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("DIFFFEAT_TEST_THREADS", 1)))
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


@pytest.fixture(scope="session")
def tiny_pipes():
    """``tiny_pipes(family)`` -> the session's tiny random pipeline of that family (built once)."""
    from _helpers import tiny

    return tiny


@pytest.fixture(scope="session")
def shapes_backbone():
    """The embedded ``shapes`` model (trained, so its attention maps are peaked, unlike a random tiny model's),
    on the CPU in float32, loaded once per session."""
    import difffeat

    return difffeat.load("shapes", device="cpu", dtype="fp32")


def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """torch at one thread: the caller's kernels are then the chunk workers' single-threaded ones."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """torch at two threads: the observer spreads the chunks of every attention call over two workers."""
    yield from _torch_threads(2)
