"""Memory of a training step: the profiler's allocation peak, the bytes of a set of storages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def allocation_peak(
    fn: Callable[[], Any], setup: Callable[[], Any] | None = None
) -> tuple[int, int, Any]:
    """Run ``fn`` under the profiler and return ``(peak, end, result)``: the largest number of
    bytes of CPU allocations live at once above what was live when ``fn`` started, and the net
    bytes still allocated when it returned. Every allocation through PyTorch's allocator counts
    (tensors, autograd buffers, compiled kernels' buffers), whoever made it. ``setup`` runs first,
    inside the same profile, so that the frees ``fn`` makes of what ``setup`` allocated are seen
    (the profiler does not report frees of blocks allocated before it started).

    Example:
        >>> peak, end, _ = allocation_peak(lambda: torch.ones(1024).sum().item())
        >>> peak >= 4096, end
        (True, 0)
    """
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    mark = "squeezer::measured"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if setup is not None:
            setup()
        with record_function(mark):
            result = fn()
    events = list(prof.profiler.kineto_results.events())
    start = min((e.start_ns() for e in events if e.name() == mark), default=0)
    memory = sorted((e.start_ns(), int(e.nbytes())) for e in events if e.name() == "[memory]")
    live = peak = 0
    for t, b in memory:
        if t >= start:
            live += b
            peak = max(peak, live)
    return peak, live, result


def storage_bytes(tensors: Sequence[torch.Tensor], skip: set[int] | None = None) -> int:
    """Bytes of the distinct storages under ``tensors`` (minus those whose data pointer is in
    ``skip``)."""
    seen = set(skip or ())
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


# ------------------------------------------------------------------------------------- tracing
