"""Checkmate's schedule: which node to (re)compute and which value to keep in every stage, at the
least compute under a peak-memory budget, as a mixed-integer program solved by HiGHS.

The formulation is Checkmate's (Jain et al., arXiv:1910.02653, section 4) with frontier-advancing
stages: stage ``t`` computes node ``t`` and may recompute any earlier node. Binary ``R[t,i]``
(compute ``i`` in stage ``t``), ``S[t,i]`` (``i``'s value is kept entering stage ``t``) and
``FREE[t,i,k]`` (``i`` is freed right after computing ``k`` in stage ``t``), continuous ``U[t,k]``
(bytes live after computing ``k``). Constraints: a node's inputs are computed or kept; only what
was computed or kept can be kept; ``FREE`` is one exactly when nothing later in the stage and
nothing after it needs the value (the paper's linearised hazard count); the memory while computing
``k``, ``U[t,k-1] + (M_k + W_k) R[t,k]``, stays within the budget (``W_k``: the node's transient).
Unlike the paper, a backward node is computed exactly once, in its own stage: recomputing it
would add its parameter gradients twice.

When the MILP does not finish within the time limit, Checkmate's fallback is tried: solve the LP
relaxation, round ``S`` at a threshold, derive the least ``R`` that the kept values allow, and keep
the cheapest rounding that fits the budget (trying a tighter LP budget when none does); the cheaper
of it and the MILP's incumbent is used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...milp import Program
from .graph import TrainGraph


@dataclass(frozen=True)
class Schedule:
    """A rematerialization schedule: per stage, the nodes computed (in order) and the values kept
    entering it; its modelled compute cost (seconds) and peak (bytes), and how it was found."""

    compute: tuple[tuple[int, ...], ...]
    keep: tuple[tuple[int, ...], ...]
    cost: float
    peak: int
    method: str
    optimal: bool = False
    solve_seconds: float = 0.0
    budget: int | None = None
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute": [list(c) for c in self.compute],
            "keep": [list(k) for k in self.keep],
            "cost": self.cost,
            "peak": self.peak,
            "method": self.method,
            "optimal": self.optimal,
            "solve_seconds": self.solve_seconds,
            "budget": self.budget,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(
            **{
                **d,
                "compute": tuple(tuple(c) for c in d["compute"]),
                "keep": tuple(tuple(k) for k in d["keep"]),
            }
        )

    @property
    def recomputed(self) -> int:
        """How many computations beyond one per node."""
        return sum(len(c) for c in self.compute) - len(self.compute)


# ----------------------------------------------------------------------------------- simulation
def _deps(graph: TrainGraph) -> list[tuple[int, ...]]:
    return [n.deps for n in graph.nodes]


def minimal_keep(graph: TrainGraph, R: np.ndarray) -> np.ndarray | None:
    """The fewest kept values that make the computations ``R`` (stages × nodes) possible, or
    None if some input was never computed before it is needed."""
    n = graph.n
    users = graph.users()
    S = np.zeros((n, n), dtype=bool)
    for i in range(n):
        last = -1
        for t in range(n):
            need = not R[t, i] and any(R[t, j] for j in users[i])
            if need:
                if last < 0:
                    return None
                S[last + 1 : t + 1, i] = True
                last = t
            if R[t, i]:
                last = t
    return S


def simulate(graph: TrainGraph, R: np.ndarray, S: np.ndarray) -> tuple[float, int, list]:
    """The modelled cost and peak of ``(R, S)`` and, per stage, the list of
    ``(node, values freed after it)`` the executor follows. Raises ValueError if the schedule
    reads a value that is neither computed nor kept."""
    n = graph.n
    deps = _deps(graph)
    users = graph.users()
    mem = [nd.memory for nd in graph.nodes]
    cost = 0.0
    peak = 0
    plan = []
    for t in range(n):
        present = {i for i in range(n) if S[t, i]}
        for i in present:
            if t == 0 or not (S[t - 1, i] or R[t - 1, i]):
                raise ValueError(f"stage {t} keeps node {i}, which the stage before did not hold")
        live = sum(mem[i] for i in present)
        computed = [k for k in range(t + 1) if R[t, k]]
        stage = []
        keep_next = S[t + 1] if t + 1 < n else np.zeros(n, dtype=bool)
        for pos, k in enumerate(computed):
            for i in deps[k]:
                if i not in present:
                    raise ValueError(f"stage {t}: node {k} reads node {i}, which is not in memory")
            peak = max(peak, live + mem[k] + graph.nodes[k].transient)
            live += mem[k]
            present.add(k)
            cost += graph.nodes[k].cost
            later = set(computed[pos + 1 :])
            freed = []
            for i in (*deps[k], k):
                if i in present and not keep_next[i] and not any(j in later for j in users[i]):
                    if i == k or k == max(j for j in users[i] if j in computed):
                        freed.append(i)
            for i in freed:
                present.discard(i)
                live -= mem[i]
            stage.append((k, tuple(freed)))
        plan.append(stage)
    return cost, int(peak), plan


def _schedule(graph, R, S, method, optimal=False, seconds=0.0, budget=None) -> Schedule:
    cost, peak, _ = simulate(graph, R, S)
    n = graph.n
    return Schedule(
        compute=tuple(tuple(int(k) for k in range(n) if R[t, k]) for t in range(n)),
        keep=tuple(tuple(int(i) for i in range(n) if S[t, i]) for t in range(n)),
        cost=cost,
        peak=peak,
        method=method,
        optimal=optimal,
        solve_seconds=seconds,
        budget=budget,
    )


def matrices(schedule: Schedule, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(R, S)`` as boolean stage × node matrices."""
    R = np.zeros((n, n), dtype=bool)
    S = np.zeros((n, n), dtype=bool)
    for t, c in enumerate(schedule.compute):
        R[t, list(c)] = True
    for t, k in enumerate(schedule.keep):
        S[t, list(k)] = True
    return R, S


def store_all(graph: TrainGraph) -> Schedule:
    """Every node computed once, every value kept until its last use: the plain training step.

    Example:
        >>> g = TrainGraph.chain([1.0, 1.0, 1.0], [10, 10, 10])
        >>> s = store_all(g)
        >>> s.cost, s.peak, s.recomputed
        (9.0, 40, 0)
    """
    R = np.eye(graph.n, dtype=bool)
    return _schedule(graph, R, minimal_keep(graph, R), "store-all", optimal=True)


# ----------------------------------------------------------------------------------------- MILP
class _Columns:
    def __init__(self) -> None:
        self.cost: list[float] = []
        self.integer: list[bool] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, cost=0.0, integer=True, lower=0.0, upper=1.0) -> int:
        self.cost.append(cost)
        self.integer.append(integer)
        self.lower.append(lower)
        self.upper.append(upper)
        return len(self.cost) - 1


def _program(graph: TrainGraph, budget: float, integer: bool):
    n = graph.n
    users = graph.users()
    deps = _deps(graph)
    top_cost = max(nd.cost for nd in graph.nodes) or 1.0
    scale = float(budget)
    mem = [nd.memory / scale for nd in graph.nodes]
    work = [(nd.memory + nd.transient) / scale for nd in graph.nodes]
    cols = _Columns()
    R: dict[tuple[int, int], int] = {}
    S: dict[tuple[int, int], int] = {}
    for t in range(n):
        for i in range(t + 1):
            fixed = 1.0 if i == t else (0.0 if graph.nodes[i].kind == "B" else None)
            lo, hi = (fixed, fixed) if fixed is not None else (0.0, 1.0)
            R[t, i] = cols.add(graph.nodes[i].cost / top_cost, integer, lo, hi)
        for i in range(t):
            S[t, i] = cols.add(0.0, integer)
    rows: list[tuple[list[int], list[float], float, float]] = []
    for t in range(n):
        for j in range(t + 1):
            for i in deps[j]:  # R[t,j] <= R[t,i] + S[t,i]
                rows.append(([R[t, j], R[t, i], S[t, i]], [1.0, -1.0, -1.0], -math.inf, 0.0))
        if t + 1 < n:
            for i in range(t + 1):  # S[t+1,i] <= S[t,i] + R[t,i]
                idx, val = [S[t + 1, i], R[t, i]], [1.0, -1.0]
                if i < t:
                    idx, val = [*idx, S[t, i]], [*val, -1.0]
                rows.append((idx, val, -math.inf, 0.0))
    for t in range(n):
        prev_u: int | None = None
        base_idx = [S[t, i] for i in range(t)]
        base_val = [mem[i] for i in range(t)]
        for k in range(t + 1):
            frees: list[tuple[int, int]] = []
            for i in (*deps[k], k):
                later = [j for j in users[i] if k < j <= t]
                f = cols.add(0.0, integer)
                frees.append((i, f))
                idx, val = [R[t, k], f], [-1.0, 1.0]
                if t + 1 < n:
                    idx, val = [*idx, S[t + 1, i]], [*val, 1.0]
                idx += [R[t, j] for j in later]
                val += [1.0] * len(later)
                hmax = 1 + (t + 1 < n) + len(later)
                rows.append((idx, val, 0.0, math.inf))  # hazards + FREE >= 1
                val2 = list(val)
                val2[1] = float(hmax)
                rows.append((idx, val2, -math.inf, hmax - 1.0))  # hazards <= hmax (1 - FREE)
            u = cols.add(0.0, False, 0.0, math.inf)
            # U[t,k] = U[t,k-1] + M_k R[t,k] - sum M_i FREE[t,i,k]
            idx = [u, R[t, k]] + [f for _, f in frees]
            val = [1.0, -mem[k]] + [mem[i] for i, _ in frees]
            peak_idx, peak_val = [R[t, k]], [work[k]]
            if prev_u is None:
                idx += base_idx
                val += [-v for v in base_val]
                peak_idx += base_idx
                peak_val += base_val
            else:
                idx.append(prev_u)
                val.append(-1.0)
                peak_idx.append(prev_u)
                peak_val.append(1.0)
            rows.append((idx, val, 0.0, 0.0))
            rows.append((peak_idx, peak_val, -math.inf, 1.0))  # memory while computing k
            prev_u = u
    prog = Program(cost=cols.cost, integer=cols.integer, lower=cols.lower, upper=cols.upper)
    for idx, val, lo, hi in rows:
        prog.add_row(idx, val, lower=lo, upper=hi)
    return prog, R, S


def _read(x: np.ndarray, index: dict[tuple[int, int], int], n: int) -> np.ndarray:
    out = np.zeros((n, n))
    for (t, i), c in index.items():
        out[t, i] = x[c]
    return out


def _complete(graph: TrainGraph, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least computations that kept values ``keep`` allow, with ``keep`` pruned to what is
    available (Checkmate's rounding: S fixed, R solved for)."""
    n = graph.n
    deps = _deps(graph)
    users = graph.users()
    R = np.zeros((n, n), dtype=bool)
    S = np.zeros((n, n), dtype=bool)
    for t in range(n):
        if t:
            S[t] = keep[t] & (S[t - 1] | R[t - 1])
            S[t, t:] = False
            for i in range(t):  # a gradient is never recomputed: keep it until its last use
                if graph.nodes[i].kind == "B" and (S[t - 1, i] or R[t - 1, i]):
                    if any(j >= t for j in users[i]):
                        S[t, i] = True
        R[t, t] = True
        for j in range(t, -1, -1):
            if R[t, j]:
                for i in deps[j]:
                    if not S[t, i]:
                        R[t, i] = True
    return R, S


def solve(
    graph: TrainGraph,
    budget: int,
    *,
    time_limit: float = 60.0,
    rounding: bool | None = None,
    seed: int = 0,
) -> Schedule | None:
    """The least-compute schedule of ``graph`` whose modelled peak stays within ``budget`` bytes,
    or None if no schedule fits.

    The MILP is solved to proven optimality unless ``time_limit`` (seconds) runs out: then
    Checkmate's LP rounding is computed too and the cheaper of it and the MILP's best point (if it
    has one) is returned. ``rounding=True`` goes straight to the LP rounding (``False``: never).

    Example:
        >>> g = TrainGraph.chain([1.0, 1.0, 1.0], [10, 10, 10], grads=[2, 2, 2])
        >>> store_all(g).peak
        32
        >>> s = solve(g, 28)
        >>> s.peak, s.recomputed, s.cost, s.method
        (24, 1, 10.0, 'milp')
    """
    t0 = time.perf_counter()
    n = graph.n
    if rounding is not True:
        prog, Ridx, Sidx = _program(graph, budget, integer=True)
        try:
            sol = prog.solve(time_limit=time_limit, seed=seed)
        except RuntimeError:
            sol = False  # time limit with no integer point
        if sol is None:
            return None
        if sol is not False:
            R = _read(sol.x, Ridx, n) > 0.5
            S = _read(sol.x, Sidx, n) > 0.5
            least = minimal_keep(graph, R)
            S = S if least is None else least
            method = "milp" if sol.optimal else "milp (time limit)"
            found = _schedule(graph, R, S, method, sol.optimal, time.perf_counter() - t0, budget)
            if sol.optimal or rounding is False:
                return found
            # Cut short: Checkmate's rounding may beat the incumbent; keep the cheaper.
            rounded = _round(graph, budget, t0)
            return found if rounded is None or found.cost <= rounded.cost else rounded
        if rounding is False:
            return None
    return _round(graph, budget, t0)


def _round(graph: TrainGraph, budget: int, t0: float) -> Schedule | None:
    n = graph.n
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    lp_budget = float(budget)
    for _ in range(8):
        prog, _, Sidx = _program(graph, lp_budget, integer=False)
        sol = prog.solve()
        if sol is None:
            break
        s_frac = _read(sol.x, Sidx, n)
        for threshold in (0.1, 0.3, 0.5, 0.7, 0.9):
            R, S = _complete(graph, s_frac >= threshold - 1e-9)
            cost, peak, _ = simulate(graph, R, S)
            if peak <= budget and (best is None or cost < best[0]):
                best = (cost, R, S)
        if best is not None:
            break
        lp_budget *= 0.85
    if best is None:
        return None
    return _schedule(
        graph, best[1], best[2], "lp-rounding", False, time.perf_counter() - t0, budget
    )
