"""How many CPU threads PyTorch (and ONNX Runtime) should use.

An OpenMP pool with more threads than there are idle cores does not just stop scaling: its threads
wait on each other at every barrier, and on a busy 2-core machine two threads ran the digits net up
to 10× slower than one. So unless the user says otherwise, squeezer uses the cores that are idle
now: the usable cores minus the one-minute load average, rounded, and at least one.

The user's word wins, in this order: an explicit ``--threads N``, then ``SQUEEZER_THREADS``, then
``OMP_NUM_THREADS`` (which PyTorch itself reads). The command line applies this policy; the Python
API leaves the process's thread settings alone (call :func:`configure_threads` to opt in).
"""

from __future__ import annotations

import os

from .errors import SqueezerError

ENV = "SQUEEZER_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def idle_cores(load: float | None = None, cores: int | None = None) -> int:
    """Usable cores minus the one-minute load average, rounded half up, at least 1.

    >>> idle_cores(load=0.2, cores=2), idle_cores(load=1.6, cores=2), idle_cores(load=9.0, cores=2)
    (2, 1, 1)
    """
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this OS: trust the core count
            return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def parse_threads(value: str | int | None) -> int | None:
    """``None`` or ``"auto"`` → None (decide later); a positive integer → itself; else an error."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise SqueezerError(
            f"threads must be a positive integer or 'auto', got {value!r}"
        ) from None
    if n < 1:
        raise SqueezerError(f"threads must be a positive integer or 'auto', got {value!r}")
    return n


def choose_threads(requested: str | int | None = None) -> tuple[int, str]:
    """The thread count to use and why: ``(n, "flag" | "SQUEEZER_THREADS" | "OMP_NUM_THREADS" |
    "idle cores")``."""
    n = parse_threads(requested)
    if n is not None:
        return n, "flag"
    env = os.environ.get(ENV)
    if env:
        n = parse_threads(env)
        if n is not None:
            return n, ENV
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp:
        try:
            if int(omp) >= 1:
                return int(omp), "OMP_NUM_THREADS"
        except ValueError:
            pass
    return idle_cores(), "idle cores"


def configure_threads(requested: str | int | None = None) -> tuple[int, str]:
    """Apply :func:`choose_threads` to PyTorch's intra-op pool; return what it chose, and why."""
    import torch

    n, why = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, why
