"""Bits and structured sparsity under one budget, solved exactly as an integer linear program.

HAWQ-V3's ILP (arXiv:2011.10680) picks one bit width per layer under linear limits. Structured
pruning adds a second choice that is not per layer: removing a channel removes it from every layer
the dependency graph couples it to (:mod:`squeezer.prune.depgraph`), so a prune ratio belongs to a
*channel group* (one conv's filters, or a whole residual stream), and a layer's cost depends on two
of them: the group of its outputs and the group of its inputs (a conv's bytes and time scale with
kept inputs × kept outputs). That product is linearised exactly: each layer picks one
*configuration* c = (bits, out ratio, in ratio) (binary z_{l,c}), each group one ratio (binary
x_{g,r}), and consistency rows Σ_{c: out(c)=r} z_{l,c} = x_{out(l),r} (and the same for inputs) tie
them, so the configurations of all layers agree on every group's ratio. Costs per configuration are
exact numbers of the really smaller layer (bytes, measured latency), Ω the loss-increase estimate.

The tables come from :func:`squeezer.prune.joint.joint_candidates`; HiGHS is reached through
:mod:`squeezer.milp`. Everything here is plain data, so a table can be saved and re-planned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, InfeasibleBudgetError
from .milp import Program

#: A layer's configuration: (weight bits, ratio of its output group, ratio of its input group).
Config = tuple[int, float, float]
#: What a budget kind is written as in ``--budget``, by the cost key of the tables.
_UNITS = {"size_bytes": ("size", "B"), "latency_ms": ("latency", "ms")}


def _key(c: Config) -> str:
    return f"{c[0]}/{c[1]:g}/{c[2]:g}"


def _config(s: str) -> Config:
    b, ro, ri = s.split("/")
    return int(b), float(ro), float(ri)


@dataclass(frozen=True)
class JointTable:
    """The candidates of a structured joint plan: plain data, JSON round trip.

    Attributes:
        groups: per channel group, its candidate prune ratios (0 first; the fraction of the group's
            channels removed after rounding).
        layers: per layer FQN, (output group, input group); None where the axis is not pruned.
        omega: per layer, per configuration, the predicted loss increase.
        costs: per cost key (``"size_bytes"``, ``"latency_ms"``), per layer, per configuration.
        group_costs: per cost key, per group, per ratio: what the group's ratio costs beside its
            layers (the BatchNorm entries of its channels).
        fixed: per cost key, what no choice changes (may be negative for a latency table whose
            per-layer sum over-counts the whole model: the dense int8 model is then predicted at
            exactly its measured latency).
        meta: how the table was made (Ω source, bits, batch of the latency table...).
    """

    groups: Mapping[str, tuple[float, ...]]
    layers: Mapping[str, tuple[str | None, str | None]]
    omega: Mapping[str, Mapping[Config, float]]
    costs: Mapping[str, Mapping[str, Mapping[Config, float]]]
    group_costs: Mapping[str, Mapping[str, Mapping[float, float]]] = field(default_factory=dict)
    fixed: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def total(self, key: str, groups: Mapping[str, float], layers: Mapping[str, Config]) -> float:
        """The cost ``key`` of one choice (every layer's configuration and group's ratio)."""
        out = self.fixed.get(key, 0.0) + sum(self.costs[key][k][c] for k, c in layers.items())
        gc = self.group_costs.get(key, {})
        return out + sum(gc.get(g, {}).get(r, 0.0) for g, r in groups.items())

    def to_dict(self) -> dict[str, Any]:
        def rows(t):
            return {k: {_key(c): v for c, v in row.items()} for k, row in t.items()}

        return {
            "groups": {g: list(r) for g, r in self.groups.items()},
            "layers": {k: list(v) for k, v in self.layers.items()},
            "omega": rows(self.omega),
            "costs": {key: rows(t) for key, t in self.costs.items()},
            "group_costs": {key: {g: {f"{r:g}": v for r, v in row.items()} for g, row in t.items()}
                            for key, t in self.group_costs.items()},  # fmt: skip
            "fixed": dict(self.fixed),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JointTable:
        def rows(t):
            return {k: {_config(c): float(v) for c, v in row.items()} for k, row in t.items()}

        return cls(
            groups={g: tuple(float(x) for x in r) for g, r in d["groups"].items()},
            layers={k: (v[0], v[1]) for k, v in d["layers"].items()},
            omega=rows(d["omega"]),
            costs={key: rows(t) for key, t in d["costs"].items()},
            group_costs={key: {g: {float(r): float(v) for r, v in row.items()}
                               for g, row in t.items()}
                         for key, t in d.get("group_costs", {}).items()},  # fmt: skip
            fixed={k: float(v) for k, v in d.get("fixed", {}).items()},
            meta=dict(d.get("meta", {})),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JointTable) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return id(self)


@dataclass(frozen=True)
class JointChoice:
    """What the structured joint ILP chose: a ratio per group, a configuration per layer, and
    what the table predicts for it (ΣΩ and every cost key)."""

    groups: Mapping[str, float]
    layers: Mapping[str, Config]
    omega: float
    achieved: Mapping[str, float]

    def bits(self) -> dict[str, int]:
        return {k: c[0] for k, c in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"groups": dict(self.groups),
                "layers": {k: {"bits": c[0], "out_ratio": c[1], "in_ratio": c[2]}
                           for k, c in self.layers.items()},
                "omega": self.omega, "achieved": dict(self.achieved)}  # fmt: skip


def _configs(table: JointTable, fqn: str, keep: Callable[[Config], bool]) -> list[Config]:
    return [c for c in table.omega[fqn] if keep(c)]


def plan_structured(
    table: JointTable,
    limits: Mapping[str, float],
    *,
    allowed: Callable[[Config], bool] | None = None,
) -> JointChoice:
    """The configuration per layer and ratio per group minimising ΣΩ under ``limits``
    ({cost key: cap}, e.g. ``{"size_bytes": 4e4, "latency_ms": 1.2}``), solved exactly.

    ``allowed`` restricts the configurations, e.g. ``lambda c: c[1] == c[2] == 0`` for a bits-only
    plan or ``lambda c: c[0] == 8`` for a prune-only plan at 8 bits, so the three are solved alike.

    Raises:
        ConfigError: a limit names a cost the table lacks, or ``allowed`` leaves a layer nothing.
        InfeasibleBudgetError: nothing allowed fits; the message names the least reachable value.

    Example:
        >>> t = JointTable(groups={"g": (0.0, 0.5)}, layers={"a": ("g", None), "b": (None, "g")},
        ...     omega={"a": {(8, 0.0, 0.0): 0.0, (8, 0.5, 0.0): 1.0},
        ...            "b": {(8, 0.0, 0.0): 0.0, (8, 0.0, 0.5): 1.0}},
        ...     costs={"size_bytes": {"a": {(8, 0.0, 0.0): 10.0, (8, 0.5, 0.0): 5.0},
        ...                           "b": {(8, 0.0, 0.0): 10.0, (8, 0.0, 0.5): 5.0}}})
        >>> plan_structured(t, {"size_bytes": 15}).groups
        {'g': 0.5}
    """
    missing = [k for k in limits if k not in table.costs]
    if missing:
        raise ConfigError(f"the joint table has no {missing[0]} costs; it holds {list(table.costs)}")
    keep = allowed or (lambda c: True)
    layers = list(table.omega)
    cfgs = {k: _configs(table, k, keep) for k in layers}
    empty = [k for k, c in cfgs.items() if not c]
    if empty:
        raise ConfigError(f"no allowed (bits, ratio) configuration for layers {empty[:3]}")
    col: dict[tuple, int] = {}
    for g, ratios in table.groups.items():
        for r in ratios:
            col["g", g, r] = len(col)
    for k in layers:
        for c in cfgs[k]:
            col["l", k, c] = len(col)
    n = len(col)
    rows: list[tuple[list[int], list[float], float, float]] = []
    for g, ratios in table.groups.items():
        rows.append(([col["g", g, r] for r in ratios], [1.0] * len(ratios), 1.0, 1.0))
    for k in layers:
        idx = [col["l", k, c] for c in cfgs[k]]
        rows.append((idx, [1.0] * len(idx), 1.0, 1.0))
        for axis, g in enumerate(table.layers[k]):
            if g is None:
                continue
            for r in table.groups[g]:
                same = [col["l", k, c] for c in cfgs[k] if c[1 + axis] == r]
                rows.append((same + [col["g", g, r]], [1.0] * len(same) + [-1.0], 0.0, 0.0))

    def coef(key: str) -> np.ndarray:
        a = np.zeros(n)
        for k in layers:
            for c in cfgs[k]:
                a[col["l", k, c]] = table.costs[key][k][c]
        for g, row in table.group_costs.get(key, {}).items():
            for r, v in row.items():
                if ("g", g, r) in col:
                    a[col["g", g, r]] = v
        return a

    def solve(obj: np.ndarray, caps: Mapping[str, float]) -> np.ndarray | None:
        scale = float(np.abs(obj).max()) or 1.0
        prog = Program(cost=obj / scale, integer=[True] * n, upper=np.ones(n))
        for idx, val, lo, hi in rows:
            prog.add_row(idx, val, lower=lo, upper=hi)
        for key, cap in caps.items():
            a = coef(key)
            s = float(np.abs(a).max()) or 1.0
            nz = np.nonzero(a)[0]
            prog.add_row(nz.tolist(), (a[nz] / s).tolist(), lower=-math.inf,
                         upper=(cap - table.fixed.get(key, 0.0)) / s)  # fmt: skip
        sol = prog.solve()
        return None if sol is None else np.round(sol.x).astype(int)

    obj = np.zeros(n)
    for k in layers:
        for c in cfgs[k]:
            obj[col["l", k, c]] = table.omega[k][c]
    # Ties in Ω (a layer with a zero trace scores every width 0) go to the wider width.
    tie = np.zeros(n)
    for k in layers:
        for c in cfgs[k]:
            tie[col["l", k, c]] = -1e-7 * (float(np.abs(obj).max()) or 1.0) * c[0] / 32
    x = solve(obj + tie, limits)
    if x is None:
        raise InfeasibleBudgetError(_infeasible(table, limits, coef, solve))
    groups = {g: r for (kind, g, r), j in col.items() if kind == "g" and x[j]}
    chosen = {k: c for (kind, k, c), j in col.items() if kind == "l" and x[j]}
    return JointChoice(
        groups=groups,
        layers=chosen,
        omega=float(sum(table.omega[k][c] for k, c in chosen.items())),
        achieved={key: table.total(key, groups, chosen) for key in table.costs},
    )


def _infeasible(table, limits, coef, solve) -> str:
    """Which limit cannot be met and the least value it can take under the others."""
    for key, cap in limits.items():
        others = {k: v for k, v in limits.items() if k != key}
        x = solve(coef(key), others)
        if x is None:
            continue
        least = float(coef(key) @ x) + table.fixed.get(key, 0.0)
        if least > cap:
            name, unit = _UNITS.get(key, (key, ""))
            return (f"budget {name}={cap:.4g}{unit} cannot be met by the allowed (bits, prune "
                    f"ratio) choices: the least reachable is {least:.4g}{unit}; raise it")  # fmt: skip
    return "the budgets cannot be met together by the allowed (bits, prune ratio) choices; raise one"
