"""Data-parallel reductions over ``torch.distributed``: shards of the data, sums of the results.

Hessian statistics are sums over data (the Hessian of a dataset-mean loss is the sample-weighted
mean of the batch Hessians), so they parallelise like data-parallel training (Goyal et al.,
"Accurate, Large Minibatch SGD", arXiv:1706.02677): each rank takes a shard of the batches, computes
its partial sum, and an all-reduce adds the partial sums. The caller (or ``torchrun``) initialises
the process group (gloo on CPU, nccl on GPU); without one, world size is 1 and every function here
is the identity, so a single process runs the same code.

Example:
    >>> world()
    (0, 1)
    >>> shard(["b0", "b1", "b2"], rank=1, world_size=2)
    ['b1']
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_active() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group.

    Example:
        >>> rank, size = world()
    """
    if not is_active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class _Shard(Iterable[T]):
    """Every ``world_size``-th item of a re-iterable, starting at ``rank`` (re-iterable itself)."""

    def __init__(self, items: Iterable[T], rank: int, world_size: int) -> None:
        self.items, self.rank, self.world_size = items, rank, world_size

    def __iter__(self) -> Iterator[T]:
        for i, item in enumerate(self.items):
            if i % self.world_size == self.rank:
                yield item


def shard(items: Iterable[T], rank: int, world_size: int) -> Iterable[T]:
    """This rank's round-robin share of ``items`` (a list for a list, else a lazy re-iterable).

    Batches are dealt round-robin, so ranks get at most one batch more than each other; results
    stay exact because every sum is weighted by its sample count, not by the number of batches.

    Example:
        >>> shard(list(range(5)), rank=0, world_size=2)
        [0, 2, 4]
    """
    if isinstance(items, list | tuple):
        return list(items[rank::world_size])
    return _Shard(items, rank, world_size)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (the identity in one process).

    With gloo the result is bitwise identical on every rank, so decisions taken from it (for
    example, stopping an iteration) agree across ranks without another message.

    Example:
        >>> all_reduce_sum(torch.ones(2))
        tensor([1., 1.])
    """
    if is_active() and dist.get_world_size() > 1:
        staged = _staged(tensor)
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        if staged is not tensor:
            tensor.copy_(staged)
    return tensor


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank (so control flow cannot diverge across ranks).

    Example:
        >>> broadcast_flag(True)
        True
    """
    if not (is_active() and dist.get_world_size() > 1):
        return flag
    t = _staged(torch.tensor([1 if flag else 0], dtype=torch.int64))
    dist.broadcast(t, src=0)
    return bool(t.item())


def launched_world_size() -> int:
    """The world size a launcher such as ``torchrun`` announced in ``WORLD_SIZE`` (1 if none)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@contextmanager
def process_group_from_env() -> Iterator[tuple[int, int]]:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) for the duration of the block, and yield ``(rank, world_size)``.

    Without a launcher, or when a group already exists, this does nothing and yields
    :func:`world`. The backend is gloo on CPU and nccl when CUDA is available; the group started
    here is destroyed on exit, even after an error.

    Example:
        >>> with process_group_from_env() as (rank, size):
        ...     rank, size
        (0, 1)
    """
    if is_active() or launched_world_size() == 1 or not dist.is_available():
        yield world()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://")
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def _staged(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a CUDA copy when the backend (nccl) cannot reduce CPU tensors."""
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        return tensor.to(f"cuda:{torch.cuda.current_device()}")
    return tensor
