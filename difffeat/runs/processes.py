"""Process handling for dataset-scale runs, on top of :class:`accelerate.PartialState`.

Under ``accelerate launch --multi_gpu --num_processes N`` every process gets a rank; on a machine without a
GPU (or with ``--device cpu``, or ``accelerate launch --cpu``) the processes are joined over gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def _wants_cpu(device: str | None) -> bool:
    if device is not None:
        return str(device).startswith("cpu")
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not torch.cuda.is_available()


def init_state(device: str | None = None):
    """The (singleton) :class:`accelerate.PartialState` of this process.

    Created with ``cpu=True`` when the run is on CPU, so that processes started by ``accelerate launch``
    form a gloo process group instead of each running alone. Call it before anything else touches
    ``PartialState`` (for example :func:`difffeat.load` with ``device=None``).
    """
    from accelerate import PartialState

    return PartialState(cpu=_wants_cpu(device))


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This process's share of ``items``: every ``world``-th item from ``rank`` (disjoint, deterministic,
    balanced to within one item, and independent of what other processes have already finished)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    return list(items[rank::world])


def _reduce(state, tensor: torch.Tensor, op: str) -> torch.Tensor:
    if state.num_processes == 1:
        return tensor.clone()
    from accelerate.utils import reduce

    if op == "max":
        import torch.distributed as dist

        t = tensor.to(state.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu()
    return reduce(tensor.to(state.device), reduction="sum").cpu()


def reduce_sum(state, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over all processes (every process gets the result)."""
    return _reduce(state, tensor, "sum")


def reduce_max(state, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over all processes."""
    return _reduce(state, tensor, "max")


def gather_list(state, items: list[T]) -> list[T]:
    """The concatenation of every process's ``items`` (picklable), in rank order, on every process."""
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))
