"""Where a training process stands in a launch (torchrun / accelerate set RANK, WORLD_SIZE, LOCAL_RANK): which rank
writes, and the barriers around what rank 0 alone does. A single process is rank 0 of 1 and every call is a no-op,
so the recipes read the same with or without a launcher.

The process group is accelerate's (PartialState, the one the Trainer then uses): initialised on first use, with
gloo on the CPU and NCCL on CUDA."""

from __future__ import annotations

import contextlib
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the run directory (reports, evaluations, weights, metrics)."""
    return rank() == 0


def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # accelerate's MULTI_CPU (gloo) needs cpu=True


def barrier() -> None:
    """Every rank waits here until all have arrived (no-op in a single process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (building caches, creating the run directory), then the others run it, so no two
    processes write the same cache file or directory at once."""
    if world_size() == 1:
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(obj):
    """Rank 0's value of `obj` on every rank (a name with a timestamp, a decision)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    _state()
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
