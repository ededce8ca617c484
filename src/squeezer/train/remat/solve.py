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
would add its parameter gradients twice. And a forward's value has two parts (see
:class:`~squeezer.train.remat.graph.Node`): ``memory``, which its own backward reads, and
``output``, which only later readers do; binary ``SO[t,i]`` keeps the output part (only with the
node, ``SO <= S``) and ``FREEO[t,i,k]`` frees it after its last reader, so an output nobody needs
any more is not counted until the node's backward.

A feasible schedule is always in hand before the MILP starts: the cheapest uniform-checkpoint
schedule that fits (:func:`checkpointed`: the forwards cut into groups, each group's last value
kept, the others recomputed once when its backward begins), which is HiGHS's starting point.

When the MILP does not finish within the time limit, Checkmate's fallback is tried too: solve the
LP relaxation, round ``S`` at a threshold, derive the least ``R`` that the kept values allow, and
keep the cheapest rounding that fits the budget (trying a tighter LP budget when none does); the
cheapest of it, the MILP's incumbent and the checkpoint schedule is used, with its gap to the
MILP's proven lower bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
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
    #: Relative gap of ``cost`` to the MILP's proven lower bound (0 when optimal; None: unknown).
    gap: float | None = None
    version: int = 2

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
            "gap": self.gap,
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


def _keep_for(graph: TrainGraph, R: np.ndarray, users: list[list[int]]) -> np.ndarray | None:
    n = graph.n
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


def minimal_keep(graph: TrainGraph, R: np.ndarray) -> np.ndarray | None:
    """The fewest kept values that make the computations ``R`` (stages × nodes) possible, or
    None if some input was never computed before it is needed."""
    return _keep_for(graph, R, graph.users())


def output_keep(graph: TrainGraph, R: np.ndarray) -> np.ndarray:
    """Where the ``output`` part of each forward must be kept entering a stage for ``R``: only
    while a reader other than its own backward is still to come."""
    S = _keep_for(graph, R, graph.output_users())
    return np.zeros((graph.n, graph.n), dtype=bool) if S is None else S


def simulate(graph: TrainGraph, R: np.ndarray, S: np.ndarray) -> tuple[float, int, list]:
    """The modelled cost and peak of ``(R, S)`` and, per stage, the list of
    ``(node, values freed after it, forwards whose output part is released after it)`` the
    executor follows. Raises ValueError if the schedule reads a value that is neither computed
    nor kept."""
    n = graph.n
    deps = _deps(graph)
    users = graph.users()
    out_users = graph.output_users()
    mem = [nd.memory for nd in graph.nodes]
    out = [nd.output for nd in graph.nodes]
    SO = output_keep(graph, R) & S
    cost = 0.0
    peak = 0
    plan = []
    for t in range(n):
        present = {i for i in range(n) if S[t, i]}
        present_o = {i for i in present if SO[t, i] and graph.nodes[i].kind == "F"}
        for i in present:
            if t == 0 or not (S[t - 1, i] or R[t - 1, i]):
                raise ValueError(f"stage {t} keeps node {i}, which the stage before did not hold")
        live = sum(mem[i] for i in present) + sum(out[i] for i in present_o)
        computed = [k for k in range(t + 1) if R[t, k]]
        stage = []
        last = t + 1 >= n
        keep_next = np.zeros(n, dtype=bool) if last else S[t + 1]
        keep_next_o = np.zeros(n, dtype=bool) if last else SO[t + 1]
        for pos, k in enumerate(computed):
            for i in deps[k]:
                if i not in present or (k in out_users[i] and i not in present_o):
                    raise ValueError(f"stage {t}: node {k} reads node {i}, which is not in memory")
            peak = max(peak, live + mem[k] + out[k] + graph.nodes[k].transient)
            live += mem[k] + out[k]
            present.add(k)
            if graph.nodes[k].kind == "F":
                present_o.add(k)
            cost += graph.nodes[k].cost
            later = set(computed[pos + 1 :])
            released = []
            for i in (*deps[k], k):
                if i in present_o and (i == k or k in out_users[i]) and not keep_next_o[i]:
                    if not any(j in later for j in out_users[i]):
                        released.append(i)
                        present_o.discard(i)
                        live -= out[i]
            freed = []
            for i in (*deps[k], k):
                if i in present and not keep_next[i] and not any(j in later for j in users[i]):
                    freed.append(i)
            for i in freed:
                present.discard(i)
                live -= mem[i]
                if i in present_o:  # a kept output part goes with its node
                    present_o.discard(i)
                    live -= out[i]
            stage.append((k, tuple(freed), tuple(released)))
        plan.append(stage)
    return cost, int(peak), plan


def _schedule(graph, R, S, method, optimal=False, seconds=0.0, budget=None, gap=None) -> Schedule:
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
        gap=0.0 if optimal else gap,
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


@dataclass
class _Layout:
    """Where each variable of the MILP sits: ``R``, ``S``, ``SO`` by (stage, node); the frees as
    ``(column, stage, value, after, part)`` (``part`` "A" for the node, "O" for its output);
    ``U`` by (stage, node)."""

    R: dict[tuple[int, int], int]
    S: dict[tuple[int, int], int]
    SO: dict[tuple[int, int], int]
    frees: list[tuple[int, int, int, int, str]]
    U: dict[tuple[int, int], int]


def _program(graph: TrainGraph, budget: float, integer: bool) -> tuple[Program, _Layout]:
    n = graph.n
    users = graph.users()
    out_users = graph.output_users()
    deps = _deps(graph)
    top_cost = max(nd.cost for nd in graph.nodes) or 1.0
    scale = float(budget)
    mem = [nd.memory / scale for nd in graph.nodes]
    out = [nd.output / scale for nd in graph.nodes]
    work = [(nd.memory + nd.output + nd.transient) / scale for nd in graph.nodes]
    split = [nd.kind == "F" and nd.output > 0 for nd in graph.nodes]
    cols = _Columns()
    lay = _Layout({}, {}, {}, [], {})
    R, S, SO = lay.R, lay.S, lay.SO
    for t in range(n):
        for i in range(t + 1):
            fixed = 1.0 if i == t else (0.0 if graph.nodes[i].kind == "B" else None)
            lo, hi = (fixed, fixed) if fixed is not None else (0.0, 1.0)
            R[t, i] = cols.add(graph.nodes[i].cost / top_cost, integer, lo, hi)
        for i in range(t):
            S[t, i] = cols.add(0.0, integer)
            if split[i]:
                SO[t, i] = cols.add(0.0, integer)
    rows: list[tuple[list[int], list[float], float, float]] = []
    for t in range(n):
        for j in range(t + 1):
            for i in deps[j]:  # R[t,j] <= R[t,i] + S[t,i] (SO[t,i] if j reads i's output part)
                keep = SO[t, i] if split[i] and j in out_users[i] and i < t else S[t, i]
                rows.append(([R[t, j], R[t, i], keep], [1.0, -1.0, -1.0], -math.inf, 0.0))
        for i in range(t):
            if split[i]:  # SO[t,i] <= S[t,i]
                rows.append(([SO[t, i], S[t, i]], [1.0, -1.0], -math.inf, 0.0))
        if t + 1 < n:
            for i in range(t + 1):  # S[t+1,i] <= S[t,i] + R[t,i], likewise SO
                for K in (S, SO) if split[i] else (S,):
                    idx, val = [K[t + 1, i], R[t, i]], [1.0, -1.0]
                    if i < t:
                        idx, val = [*idx, K[t, i]], [*val, -1.0]
                    rows.append((idx, val, -math.inf, 0.0))
    for t in range(n):
        prev_u: int | None = None
        base_idx = [S[t, i] for i in range(t)] + [SO[t, i] for i in range(t) if split[i]]
        base_val = [mem[i] for i in range(t)] + [out[i] for i in range(t) if split[i]]
        for k in range(t + 1):
            frees: list[tuple[float, int]] = []
            for i in (*deps[k], k):
                parts = [("A", users, S, mem)]
                if split[i] and (k == i or k in out_users[i]):
                    parts.append(("O", out_users, SO, out))
                for part, us, K, size in parts:
                    later = [j for j in us[i] if k < j <= t]
                    f = cols.add(0.0, integer)
                    lay.frees.append((f, t, i, k, part))
                    frees.append((size[i], f))
                    idx, val = [R[t, k], f], [-1.0, 1.0]
                    if t + 1 < n:
                        idx, val = [*idx, K[t + 1, i]], [*val, 1.0]
                    idx += [R[t, j] for j in later]
                    val += [1.0] * len(later)
                    hmax = 1 + (t + 1 < n) + len(later)
                    rows.append((idx, val, 0.0, math.inf))  # hazards + FREE >= 1
                    val2 = list(val)
                    val2[1] = float(hmax)
                    rows.append((idx, val2, -math.inf, hmax - 1.0))  # hazards <= hmax (1 - FREE)
            u = cols.add(0.0, False, 0.0, math.inf)
            lay.U[t, k] = u
            # U[t,k] = U[t,k-1] + (M_k + O_k) R[t,k] - sum of what is freed after k
            idx = [u, R[t, k]] + [f for _, f in frees]
            val = [1.0, -(mem[k] + out[k])] + [size for size, _ in frees]
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
    return prog, lay


def _start(graph: TrainGraph, lay: _Layout, budget: float, R: np.ndarray, S: np.ndarray):
    """The MILP's column values for the schedule ``(R, S)``: a feasible start for HiGHS."""
    n = graph.n
    users, out_users = graph.users(), graph.output_users()
    SO = output_keep(graph, R) & S
    x = np.zeros(max(lay.U.values()) + 1)
    for K, M in ((lay.R, R), (lay.S, S), (lay.SO, SO)):
        for (t, i), c in K.items():
            x[c] = float(M[t, i])
    freed: dict[tuple[int, int], float] = {}
    for c, t, i, k, part in lay.frees:
        us, K = (users, S) if part == "A" else (out_users, SO)
        hazard = (t + 1 < n and K[t + 1, i]) or any(R[t, j] for j in us[i] if k < j <= t)
        x[c] = float(R[t, k] and not hazard)
        size = graph.nodes[i].memory if part == "A" else graph.nodes[i].output
        freed[t, k] = freed.get((t, k), 0.0) + x[c] * size / budget
    for t in range(n):
        u = sum(
            graph.nodes[i].memory * S[t, i] + graph.nodes[i].output * SO[t, i] for i in range(t)
        )
        u /= budget
        for k in range(t + 1):
            nd = graph.nodes[k]
            u += (nd.memory + nd.output) / budget * R[t, k] - freed.get((t, k), 0.0)
            x[lay.U[t, k]] = max(u, 0.0)
    return x


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
    least = minimal_keep(graph, R)
    return R, (S if least is None else least)


def peak_floor(graph: TrainGraph) -> int:
    """A lower bound on the modelled peak of every schedule: the most that computing one node
    needs at once (its inputs' parts it reads, its value and its transient).

    Example:
        >>> peak_floor(TrainGraph.chain([1.0, 1.0], [10, 10], grads=[2, 2]))
        22
    """
    out_users = graph.output_users()
    floor = 0
    for k, nd in enumerate(graph.nodes):
        need = nd.memory + nd.output + nd.transient
        for i in nd.deps:
            d = graph.nodes[i]
            need += d.memory + (d.output if k in out_users[i] else 0)
        floor = max(floor, need)
    return floor


def checkpointed(graph: TrainGraph, groups: int, by: str = "count") -> Schedule:
    """Uniform checkpointing as a schedule of ``graph`` (Chen et al., arXiv:1604.06174; what
    ``torch.utils.checkpoint`` does over ``groups`` segments): the forwards cut into ``groups``
    contiguous groups (of equal count, or ``by="memory"``: of equal kept bytes), the last value
    of each group kept, the others dropped after the forward and recomputed once when the group's
    backward begins; the last group is kept whole.

    Example:
        >>> g = TrainGraph.chain([1.0] * 4, [10] * 4, grads=[2] * 4)
        >>> s = checkpointed(g, 2)
        >>> s.recomputed, s.peak < store_all(g).peak
        (2, True)
    """
    n = graph.n
    fwd = [i for i, nd in enumerate(graph.nodes) if nd.kind == "F"]
    own = graph.own_backward()
    groups = max(1, min(groups, len(fwd)))
    if by == "memory":
        size = np.cumsum([graph.nodes[i].memory + graph.nodes[i].output for i in fwd])
        edges = [0] + [
            int(np.searchsorted(size, size[-1] * g / groups)) + 1 for g in range(1, groups)
        ]
        edges = sorted(set(min(e, len(fwd) - 1) for e in edges) | {0}) + [len(fwd)]
    else:
        edges = [round(g * len(fwd) / groups) for g in range(groups + 1)]
    keep = np.zeros((n, n), dtype=bool)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        members = fwd[a:b]
        if not members:
            continue
        first_b = min((own[i] for i in members if own[i] >= 0), default=n)
        for i in members:
            if i == members[-1] or b == len(fwd):
                keep[:, i] = True
            else:
                keep[first_b:, i] = True
    R, S = _complete(graph, keep)
    return _schedule(graph, R, S, f"checkpoint, {len(edges) - 1} groups")


def _best_checkpointed(graph: TrainGraph, budget: int) -> Schedule | None:
    """The cheapest :func:`checkpointed` schedule within ``budget`` (any group count, either
    split), or None."""
    k = sum(nd.kind == "F" for nd in graph.nodes)
    best = None
    for by in ("count", "memory"):
        for g in range(1, k + 1):
            s = checkpointed(graph, g, by)
            if s.peak <= budget and (best is None or s.cost < best.cost):
                best = s
    return best


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

    The MILP starts from the cheapest uniform-checkpoint schedule that fits (if one does) and is
    solved to proven optimality unless ``time_limit`` (seconds) runs out: then Checkmate's LP
    rounding is computed too and the cheapest of it, the MILP's best point and the checkpoint
    schedule is returned, with its ``gap`` to the MILP's lower bound. ``rounding=True`` goes
    straight to the LP rounding (``False``: never).

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
    if peak_floor(graph) > budget:
        return None  # some node cannot be computed within the budget
    warm = _best_checkpointed(graph, budget)
    if rounding is True:
        return _cheapest([_round(graph, budget, t0), warm], t0)
    prog, lay = _program(graph, budget, integer=True)
    start = None if warm is None else _start(graph, lay, budget, *matrices(warm, n))
    try:
        sol = prog.solve(time_limit=time_limit, seed=seed, start=start)
    except RuntimeError:
        sol = False  # time limit with no integer point
    if sol is None:
        return warm  # proven infeasible (a fitting warm start would contradict it)
    found = bound = None
    if sol is not False:
        R = _read(sol.x, lay.R, n) > 0.5
        least = minimal_keep(graph, R)
        S = _read(sol.x, lay.S, n) > 0.5 if least is None else least
        method = "milp" if sol.optimal else "milp (time limit)"
        found = _schedule(graph, R, S, method, sol.optimal, time.perf_counter() - t0, budget)
        if found.peak > budget:  # numerically off: do not trust it
            found = None
        elif sol.optimal:
            return found
        top_cost = max(nd.cost for nd in graph.nodes) or 1.0
        if math.isfinite(sol.bound):
            bound = sol.bound * top_cost
    candidates = [found, warm]
    if rounding is None:
        candidates.append(_round(graph, budget, t0))
    return _cheapest(candidates, t0, bound)


def _cheapest(candidates: list, t0: float, bound: float | None = None) -> Schedule | None:
    fits = [c for c in candidates if c is not None]
    if not fits:
        return None
    best = min(fits, key=lambda c: c.cost)
    gap = None if bound is None else max(0.0, (best.cost - bound) / best.cost)
    return replace(best, solve_seconds=time.perf_counter() - t0, gap=gap)


def _round(graph: TrainGraph, budget: int, t0: float) -> Schedule | None:
    n = graph.n
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    lp_budget = float(budget)
    for _ in range(8):
        prog, lay = _program(graph, lp_budget, integer=False)
        sol = prog.solve()
        if sol is None:
            break
        s_frac = _read(sol.x, lay.S, n)
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
