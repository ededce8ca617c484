"""Mixed-integer linear programs solved with HiGHS (``highspy``): one small wrapper that the planner
(bit allocation, :mod:`squeezer.plan`) and any later user (rematerialization schedules) share,
without either importing the other.

A program is ``min c·x`` subject to sparse rows ``lower ≤ a·x ≤ upper`` and column bounds, with
each column continuous or integer. Rows and the objective should be scaled by the caller so their
largest coefficients are about 1: HiGHS's tolerances are absolute.

Example:
    >>> p = Program(cost=[1.0, 2.0], integer=[True, True], upper=[1.0, 1.0])
    >>> p.add_row([0, 1], [1.0, 1.0], lower=1.0)
    >>> p.solve().x.tolist()
    [1.0, 0.0]
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_BANNER_SHOWN = False


def _quiet_highs(highspy):
    """A silent ``highspy.Highs()``. The C++ constructor prints its banner ("Running HiGHS ...
    Copyright ...") on file descriptor 1 the first time one is made in a process, before any option
    can turn output off; so that first construction runs with fd 1 pointed at the null device
    (Python's and C's buffers flushed either side, so no other output is lost or swallowed)."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        h = highspy.Highs()
    else:
        import ctypes

        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            h = highspy.Highs()
            ctypes.CDLL(None).fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(null)
        _BANNER_SHOWN = True
    h.silent()
    return h


@dataclass(frozen=True)
class Solution:
    """An optimal point of a :class:`Program`: the column values, the objective, and whether the
    time limit cut the search short (then ``x`` is the best point found, not proven optimal)."""

    x: np.ndarray
    objective: float
    optimal: bool
    gap: float
    #: The best proven lower bound on the objective (equal to it when optimal).
    bound: float = math.nan


@dataclass
class Program:
    """A MILP in HiGHS's form. ``cost``, ``lower``/``upper`` (column bounds, default [0, ∞)) and
    ``integer`` (per column) are set at construction; :meth:`add_row` appends constraints."""

    cost: Sequence[float]
    integer: Sequence[bool] | None = None
    lower: Sequence[float] | None = None
    upper: Sequence[float] | None = None
    rows: list[tuple[list[int], list[float], float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cost = np.asarray(self.cost, dtype=np.float64)
        n = self.n
        self.integer = [False] * n if self.integer is None else list(self.integer)
        self.lower = np.zeros(n) if self.lower is None else np.asarray(self.lower, dtype=float)
        self.upper = (
            np.full(n, math.inf) if self.upper is None else np.asarray(self.upper, dtype=float)
        )
        if not (len(self.integer) == len(self.lower) == len(self.upper) == n):
            raise ValueError("cost, integer, lower and upper must have one entry per column")

    @property
    def n(self) -> int:
        return int(len(self.cost))

    def add_row(
        self,
        index: Sequence[int],
        value: Sequence[float],
        *,
        lower: float = -math.inf,
        upper: float = math.inf,
    ) -> None:
        """Append ``lower ≤ Σ value[k]·x[index[k]] ≤ upper``."""
        self.rows.append(([int(i) for i in index], [float(v) for v in value], lower, upper))

    def solve(
        self,
        objective: Sequence[float] | None = None,
        *,
        time_limit: float | None = None,
        rel_gap: float = 0.0,
        threads: int = 1,
        seed: int = 0,
        start: Sequence[float] | None = None,
    ) -> Solution | None:
        """Solve (with ``objective`` in place of ``cost`` if given); None if infeasible.

        ``rel_gap=0`` asks for proven optimality. With ``time_limit`` (seconds) the best point
        found by then is returned with ``optimal=False``; a limit reached with no point at all
        raises RuntimeError. ``start``: a feasible point (one value per column) HiGHS starts its
        search from, so a time limit still returns at least that point.
        """
        import highspy

        h = _quiet_highs(highspy)
        options: list[tuple[str, object]] = [
            ("mip_rel_gap", float(rel_gap)),
            ("mip_abs_gap", 0.0 if rel_gap == 0 else 1e-6),
            ("mip_feasibility_tolerance", 1e-9),
            ("primal_feasibility_tolerance", 1e-9),
            ("threads", int(threads)),
            ("random_seed", int(seed)),
        ]
        if time_limit is not None:
            options.append(("time_limit", float(time_limit)))
        for name, value in options:
            h.setOptionValue(name, value)
        n = self.n
        inf = highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_ = n
        lp.num_row_ = len(self.rows)
        obj = self.cost if objective is None else np.asarray(objective, dtype=np.float64)
        lp.col_cost_ = np.asarray(obj, dtype=np.float64)
        lp.col_lower_ = np.maximum(np.asarray(self.lower, dtype=np.float64), -inf)
        lp.col_upper_ = np.minimum(np.asarray(self.upper, dtype=np.float64), inf)
        lp.row_lower_ = np.array([max(r[2], -inf) for r in self.rows], dtype=np.float64)
        lp.row_upper_ = np.array([min(r[3], inf) for r in self.rows], dtype=np.float64)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.num_col_ = n
        lp.a_matrix_.num_row_ = len(self.rows)
        lp.a_matrix_.start_ = np.cumsum([0] + [len(r[0]) for r in self.rows]).astype(np.int32)
        lp.a_matrix_.index_ = np.array([j for r in self.rows for j in r[0]], dtype=np.int32)
        lp.a_matrix_.value_ = np.array([v for r in self.rows for v in r[1]], dtype=np.float64)
        if any(self.integer):
            lp.integrality_ = [
                highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                for i in self.integer
            ]
        h.passModel(lp)
        if start is not None:
            given = highspy.HighsSolution()
            given.col_value = [float(v) for v in start]
            h.setSolution(given)
        h.run()
        status = h.getModelStatus()
        S = highspy.HighsModelStatus
        if status == S.kInfeasible:
            return None
        optimal = status == S.kOptimal
        limited = status in (S.kTimeLimit, S.kIterationLimit, S.kSolutionLimit)
        if not optimal and not limited:
            raise RuntimeError(f"HiGHS stopped with status {h.modelStatusToString(status)}")
        x = np.asarray(h.getSolution().col_value, dtype=np.float64)
        value = float(h.getInfo().objective_function_value)
        if start is not None and abs(float(obj @ x) - value) > 1e-7 * max(1.0, abs(value)):
            # HiGHS 1.16, given a start, can return the start as its point with the objective
            # of a better one it found. Proven optimal: solve again without the start; cut
            # short: the start is the point, at its own objective.
            if optimal:
                return self.solve(
                    objective, time_limit=time_limit, rel_gap=rel_gap, threads=threads, seed=seed
                )
            value = float(obj @ x)
        if limited and (
            x.size != n or not np.isfinite(x).all() or not h.getInfo().primal_solution_status
        ):
            raise RuntimeError("HiGHS reached its time limit before finding a feasible point")
        info = h.getInfo()
        objective_value = value
        if any(self.integer):
            gap, bound = float(info.mip_gap), float(info.mip_dual_bound)
        else:
            gap, bound = 0.0, objective_value
        return Solution(x, objective_value, optimal, gap, bound)
