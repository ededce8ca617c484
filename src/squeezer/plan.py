"""Bit allocation under budgets, solved exactly as an integer linear program.

HAWQ-V3 (Yao et al., arXiv:2011.10680) writes mixed-precision selection as an integer linear
program: one binary x_{i,b} per layer i and candidate bit width b, exactly one chosen per layer,
minimising the summed sensitivity ΣΩ_i(b) x_{i,b} (HAWQ-V2, arXiv:1911.03852) subject to linear
limits on model size, bit operations (BOPs) and latency. We add the parameter-weighted average
weight bits, ties (layers that must share a width, e.g. the convolutions whose outputs meet at one
residual add) and pinned layers, and solve with HiGHS (``highspy``) to proven optimality
(zero MIP gap).

A budget value may be relative (HAWQ-V3's convention): ``size=0.5r`` is all-lowest-bits size plus
0.5 × (all-highest − all-lowest). An infeasible budget raises
:class:`~squeezer.errors.InfeasibleBudgetError` naming the smallest feasible value, found by a
second integer program that minimises that budget's cost under the other limits.

:func:`pareto_frontier` traces HAWQ-V2's size-vs-ΣΩ frontier by re-solving over a grid of budgets.

The cost coefficients come from :mod:`squeezer.costs`, the budget kinds from :mod:`squeezer.budget`,
the residual ties from :mod:`squeezer.ties`; HiGHS is reached through :mod:`squeezer.milp`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .budget import BUDGET_KINDS, Budget
from .config import LayerQuant, Plan
from .costs import Costs
from .errors import ConfigError, InfeasibleBudgetError
from .milp import Program
from .sensitivity import Sensitivity

Ties = Sequence[Sequence[str]]
#: A template: one LayerQuant for every planned layer, or a Plan giving each layer its own.
Template = LayerQuant | Plan

# --------------------------------------------------------------------------------------------------
# The integer program


@dataclass
class _Program:
    """One-hot ILP over (layer, bit) choices; rows are (indices, values, lower, upper). Each edge
    adds a continuous column t ≥ |float(i) − float(j)|: 1 when exactly one of the two layers runs
    in float, which is what a latency table's boundary costs are charged on."""

    layers: list[str]
    choices: list[tuple[int, ...]]  # candidate bits per layer
    objective: np.ndarray
    rows: list[tuple[list[int], list[float], float, float]] = field(default_factory=list)
    upper: np.ndarray | None = None
    edges: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offset = np.cumsum([0] + [len(c) for c in self.choices])
        for i in range(len(self.layers)):  # exactly one width per layer
            idx = list(range(self.offset[i], self.offset[i + 1]))
            self.rows.append((idx, [1.0] * len(idx), 1.0, 1.0))
        self.upper = np.ones(int(self.offset[-1]))

    @property
    def n(self) -> int:
        return int(self.offset[-1]) + len(self.edges)

    def var(self, i: int, bits: int) -> int:
        return int(self.offset[i]) + self.choices[i].index(bits)

    def add_edge(self, i: int, j: int) -> None:
        """The column t of edge (i, j), with t ≥ f_i − f_j and t ≥ f_j − f_i (f: in float)."""
        t = self.n
        self.edges.append((i, j))
        self.upper = np.append(self.upper, 1.0)
        self.objective = np.append(self.objective, 0.0)
        fi = [self.var(i, b) for b in self.choices[i] if b >= 16]
        fj = [self.var(j, b) for b in self.choices[j] if b >= 16]
        for sign in (1.0, -1.0):
            vals = [1.0] + [-sign] * len(fi) + [sign] * len(fj)
            self.rows.append(([t, *fi, *fj], vals, 0.0, math.inf))

    def limit(self, coef: np.ndarray, cap: float) -> None:
        """Σ coef·x ≤ cap, scaled so the row's largest coefficient is 1 (HiGHS tolerances are
        absolute, and byte or BOP counts run to 1e9)."""
        scale = float(np.abs(coef).max()) or 1.0
        nz = np.nonzero(coef)[0]
        self.rows.append((nz.tolist(), (coef[nz] / scale).tolist(), -math.inf, cap / scale))

    def solve(self, objective: np.ndarray | None = None) -> np.ndarray | None:
        """The optimal 0/1 vector, or None if infeasible (HiGHS, proven optimal)."""
        obj = self.objective if objective is None else objective
        scale = float(np.abs(obj).max()) or 1.0
        integer = [True] * int(self.offset[-1]) + [False] * len(self.edges)
        prog = Program(cost=obj / scale, integer=integer, upper=self.upper)
        for idx, val, lo, hi in self.rows:
            prog.add_row(idx, val, lower=lo, upper=hi)
        sol = prog.solve()
        if sol is None:
            return None
        return np.round(sol.x).astype(int)

    def assignment(self, x: np.ndarray) -> dict[str, int]:
        out = {}
        for i, fqn in enumerate(self.layers):
            j = int(np.argmax(x[self.offset[i] : self.offset[i + 1]]))
            out[fqn] = self.choices[i][j]
        return out


def _build(
    sens: Sensitivity,
    costs: Costs,
    ties: Ties,
    bits: Sequence[int] | None,
    pin: Mapping[str, int],
) -> _Program:
    cand = tuple(sorted(set(sens.bits if bits is None else (int(b) for b in bits))))
    extra = [b for b in cand if b not in sens.bits]
    if extra:
        raise ConfigError(
            f"bits {extra} have no sensitivity; choose among {list(sens.bits)} "
            "or recompute the sensitivity with those widths"
        )
    layers = sens.layers
    if not layers:
        raise ConfigError("the sensitivity holds no layers; the model has nothing to quantize")
    missing = [k for k in layers if k not in costs.params]
    if missing:
        raise ConfigError(
            f"the costs do not cover layers {missing[:3]}; build costs and sensitivity "
            "from the same model"
        )
    for fqn, b in pin.items():
        if fqn not in sens.omega:
            raise ConfigError(
                f"pinned layer {fqn!r} is not in the sensitivity; known: {layers[:5]}"
            )
        if int(b) not in sens.bits:
            raise ConfigError(f"layer {fqn!r} is pinned to {b} bits, not among {list(sens.bits)}")
    choices = [tuple(sorted(set(cand) | ({int(pin[k])} if k in pin else set()))) for k in layers]
    obj = np.array([sens.omega[k][b] for k, c in zip(layers, choices, strict=True) for b in c])
    prog = _Program(layers, choices, obj)
    for fqn, b in pin.items():
        i = layers.index(fqn)
        for bb in choices[i]:
            if bb != int(b):
                prog.upper[prog.var(i, bb)] = 0.0
    for group in ties:
        unknown = [k for k in group if k not in sens.omega]
        if unknown:
            raise ConfigError(
                f"tied layers {unknown} are not in the sensitivity; known: {layers[:5]}"
            )
        first = layers.index(group[0])
        for other in group[1:]:
            j = layers.index(other)
            for b in set(choices[first]) | set(choices[j]):
                row_idx, row_val = [], []
                if b in choices[first]:
                    row_idx.append(prog.var(first, b))
                    row_val.append(1.0)
                if b in choices[j]:
                    row_idx.append(prog.var(j, b))
                    row_val.append(-1.0)
                prog.rows.append((row_idx, row_val, 0.0, 0.0))
    for a, b, _ms in costs.latency_edges:
        if a in sens.omega and b in sens.omega:
            prog.add_edge(layers.index(a), layers.index(b))
    return prog


def _coef(prog: _Program, costs: Costs, key: str) -> np.ndarray:
    per_choice = [costs.cost(key, k, b) for k, c in zip(prog.layers, prog.choices, strict=True)
                  for b in c]  # fmt: skip
    edge_ms = {(a, b): ms for a, b, ms in costs.latency_edges}
    edges = [edge_ms[prog.layers[i], prog.layers[j]] if key == "latency_ms" else 0.0
             for i, j in prog.edges]  # fmt: skip
    return np.array(per_choice + edges)


def _extremes(
    costs: Costs, key: str, layers: Sequence[str], choices: Sequence[Sequence[int]]
) -> tuple[float, float]:
    """The budget kind's value with every layer at its lowest, and at its highest, width."""
    lo = costs.total(key, {k: min(c) for k, c in zip(layers, choices, strict=True)})
    hi = costs.total(key, {k: max(c) for k, c in zip(layers, choices, strict=True)})
    return lo, hi


def _limits(
    budget: Budget, layers: Sequence[str], costs: Costs, choices: Sequence[Sequence[int]]
) -> dict[str, float]:
    """{budget key: absolute limit}, resolving HAWQ-V3's relative values."""
    out = {}
    for key, value in budget.limits().items():
        if not costs.available(key):
            raise ConfigError(
                f"a {BUDGET_KINDS[key].key} budget needs {key} costs; build them with "
                "squeezer.costs.plan_costs(model, ..., example=...)"
                + (", latency=layer_latency_table(...)" if key == "latency_ms" else "")
            )
        if key in budget.relative:
            lo, hi = _extremes(costs, key, layers, choices)
            value = lo + value * (hi - lo)
        out[key] = float(value)
    return out


def plan(
    sensitivity: Sensitivity,
    budget: Budget,
    *,
    costs: Costs,
    ties: Ties = (),
    bits: Sequence[int] | None = None,
    pin: Mapping[str, int] | None = None,
    template: Template | None = None,
) -> Plan:
    """The bit width per layer that minimises ΣΩ under ``budget``, solved exactly (HiGHS ILP).

    Args:
        sensitivity: Ω per layer and bit width (:func:`squeezer.sensitivity.sensitivity`).
        budget: any combination of size, average bits, BOPs and latency; relative values allowed.
        costs: per-layer, per-bit costs (:func:`layer_costs`).
        ties: groups of FQNs that must share one width (:func:`residual_ties`).
        bits: restrict the candidate widths (default: the sensitivity's).
        pin: {FQN: bits} fixed choices (e.g. keep the first layer at 8 bits).
        template: the LayerQuant every planned layer copies with ``bits`` replaced, or a Plan
            giving each layer its own (a per-layer template such as Q-BERT's). Default: the
            costs' ``templates`` or ``template``, else the sensitivity's granularity with
            activations at ``costs.act_bits``.

    Returns:
        A :class:`Plan`; ``plan.meta`` records the method, the budget, the predicted ΣΩ and the
        size, average bits, BOPs and latency achieved.

    Raises:
        InfeasibleBudgetError: no assignment meets the budget; the message names the smallest
            feasible value of the limit at fault.

    Example:
        >>> s = Sensitivity({"a": {2: 9.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}, "trace", (2, 8),
        ...                 {"a": 100, "b": 100})
        >>> p = plan(s, Budget(bits=5), costs=Costs(params={"a": 100, "b": 100}))
        >>> p.bits()
        {'a': 8, 'b': 2}
    """
    t0 = time.perf_counter()
    pin = dict(pin or {})
    template = _template(sensitivity, costs, template)
    prog = _build(sensitivity, costs, ties, bits, pin)
    limits = _limits(budget, prog.layers, costs, prog.choices)
    coefs = {key: _coef(prog, costs, key) for key in limits}
    for key, cap in limits.items():
        prog.limit(coefs[key], cap - costs.fixed(key))
    x = prog.solve()
    if x is None:
        raise InfeasibleBudgetError(
            _infeasible_message(lambda: _build(sensitivity, costs, ties, bits, pin), costs, budget)
        )
    assignment = prog.assignment(x)
    meta = {
        "method": sensitivity.method,
        "planner": "ilp-highs",
        "budget": str(budget),
        "budget_limits": limits,
        "predicted_omega": sensitivity.total(assignment),
        "achieved": achieved(assignment, costs),
        "ties": [list(g) for g in ties],
        "pinned": pin,
        "solve_s": round(time.perf_counter() - t0, 4),
    }
    # A layer the plan keeps in float (16 or 32 bits) keeps its activations in float too.
    layers = {
        k: replace(template(k), bits=b, **({"act_bits": None} if b >= 16 else {}))
        for k, b in assignment.items()
    }
    return Plan(layers, meta=meta)


def achieved(bits: Mapping[str, int], costs: Costs) -> dict[str, float]:
    """Size, average bits, BOPs and latency of an assignment {FQN: bits}, where costs allow.

    Example:
        >>> achieved({"fc": 4}, Costs(params={"fc": 10}))
        {'bits': 4.0}
    """
    return {key: costs.total(key, bits) for key in BUDGET_KINDS if costs.available(key)}


def _template(sens: Sensitivity, costs: Costs, template: Template | None):
    """``fqn -> LayerQuant`` of the planned layers, checked against what the sensitivity and the
    costs were computed for."""
    if template is None:
        template = Plan(costs.templates) if costs.templates else costs.template
    if template is None:
        one = LayerQuant(
            bits=8,
            granularity=sens.granularity,
            group_size=sens.group_size,
            symmetric=bool(sens.meta.get("symmetric", True)),
            observer=str(sens.meta.get("observer", "minmax")),
            act_bits=costs.act_bits,
        )
        return lambda fqn: one
    if isinstance(template, Plan):
        missing = [k for k in sens.layers if k not in template.layers]
        if missing:
            raise ConfigError(f"the template plan has no quantizer for layers {missing[:3]}")
        per_layer = dict(template.layers)
        grans = sens.meta.get("granularity") or {}
        for k in sens.layers:
            want = tuple(grans.get(k) or (sens.granularity, sens.group_size))
            _same_granularity(per_layer[k], want[0], want[1])
        return per_layer.__getitem__
    _same_granularity(template, sens.granularity, sens.group_size)
    if costs.template is not None and (
        (template.granularity, template.group_size, template.symmetric)
        != (costs.template.granularity, costs.template.group_size, costs.template.symmetric)
    ):
        raise ConfigError(
            "the template's weight granularity differs from the one the size costs were built "
            "for; build the costs with plan_costs(..., template=the same LayerQuant)"
        )
    if costs.macs is not None and template.act_bits != costs.act_bits:
        raise ConfigError(
            f"the template's act_bits={template.act_bits} differ from the costs' "
            f"act_bits={costs.act_bits}; build the costs with the same act_bits"
        )
    return lambda fqn: template


def _same_granularity(lq: LayerQuant, granularity: str, group_size: int | None) -> None:
    if (lq.granularity, lq.group_size) != (granularity, group_size):
        raise ConfigError(
            f"the plan quantizes weights per {lq.granularity} but the sensitivity was "
            f"computed per {granularity}; recompute it with granularity="
            f"{lq.granularity!r} (and the same group_size)"
        )


def _infeasible_message(build: Callable[[], _Program], costs: Costs, budget: Budget) -> str:
    """Name the first limit that cannot be met even at its own minimum under the other limits
    (``build()`` makes a fresh program of the failed plan, without limits)."""
    prog0 = build()
    limits = _limits(budget, prog0.layers, costs, prog0.choices)
    for key in limits:
        prog = build()
        for other, cap in limits.items():
            if other != key:
                prog.limit(_coef(prog, costs, other), cap - costs.fixed(other))
        coef = _coef(prog, costs, key)
        x = prog.solve(objective=coef)
        if x is None:
            continue  # the other limits are infeasible on their own; report one of them
        best = costs.fixed(key) + float(coef @ x)
        name, unit = BUDGET_KINDS[key].key, BUDGET_KINDS[key].unit
        others = " with the other limits" if len(limits) > 1 else ""
        extra = ""
        if key in budget.relative:
            lo, hi = _extremes(costs, key, prog.layers, prog.choices)
            r = (best - lo) / (hi - lo) if hi > lo else 0.0
            extra = f" ({name}={_ceil(r, 4):g}r)"
        return (
            f"budget {name}={_fmt(limits[key], key)}{unit} cannot be met: the smallest feasible "
            f"{name}{others} is {name}={_fmt(best, key, up=True)}{unit}{extra}; raise it"
        )
    return f"budget {budget} cannot be met by any bit assignment; loosen one of its limits"


def _ceil(v: float, digits: int) -> float:
    return math.ceil(v * 10**digits - 1e-9) / 10**digits


def _fmt(v: float, key: str, up: bool = False) -> str:
    if key in ("size_bytes", "bops"):
        return str(int(math.ceil(v - 1e-9)) if up else round(v))
    return f"{_ceil(v, 4) if up else round(v, 4):g}"


# --------------------------------------------------------------------------------------------------
# Pareto frontier


@dataclass(frozen=True)
class FrontierPoint:
    """One optimal trade-off: the budget kind's value, the predicted ΣΩ and the bits behind it."""

    cost: float
    omega: float
    bits: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"cost": self.cost, "omega": self.omega, "bits": dict(self.bits)}


def pareto_frontier(
    sensitivity: Sensitivity,
    costs: Costs,
    *,
    key: str = "size_bytes",
    points: int = 25,
    ties: Ties = (),
    bits: Sequence[int] | None = None,
) -> list[FrontierPoint]:
    """HAWQ-V2's frontier of ΣΩ against a budget kind (model size by default).

    Solves the ILP at ``points`` budgets evenly spaced from the all-lowest to the all-highest cost
    and keeps the distinct optimal points, sorted by cost (each has the least ΣΩ at its cost).

    Example:
        >>> s = Sensitivity({"a": {2: 9.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}, "trace", (2, 8),
        ...                 {"a": 100, "b": 100})
        >>> f = pareto_frontier(s, Costs(params={"a": 100, "b": 100}), key="bits", points=3)
        >>> [(p.cost, p.omega) for p in f]
        [(2.0, 10.0), (5.0, 1.0), (8.0, 0.0)]
    """
    if key not in BUDGET_KINDS:
        raise ConfigError(f"unknown frontier key {key!r}; choose one of {', '.join(BUDGET_KINDS)}")
    if not costs.available(key):
        raise ConfigError(f"the costs hold no {key} table; build them with layer_costs(...)")
    base = _build(sensitivity, costs, ties, bits, {})
    coef = _coef(base, costs, key)
    lo, hi = _extremes(costs, key, base.layers, base.choices)
    seen: dict[tuple[int, ...], FrontierPoint] = {}
    for cap in np.linspace(lo, hi, max(points, 2)):
        prog = _build(sensitivity, costs, ties, bits, {})
        prog.limit(coef, float(cap) - costs.fixed(key) + 1e-9 * max(abs(hi), 1.0))
        x = prog.solve()
        if x is None:
            continue
        a = prog.assignment(x)
        sig = tuple(a[k] for k in prog.layers)
        if sig not in seen:
            seen[sig] = FrontierPoint(costs.total(key, a), sensitivity.total(a), a)
    pts = sorted(seen.values(), key=lambda p: (p.cost, p.omega))
    # Keep only non-dominated points (a cheaper point with no more ΣΩ dominates a dearer one).
    out: list[FrontierPoint] = []
    for p in pts:
        if not out or p.omega < out[-1].omega:
            out.append(p)
    return out


# Names that moved to their own modules; the old paths work for one release.
_MOVED = {
    "plan_costs": ("squeezer.costs", "plan_costs"),
    "latency_table": ("squeezer.layer_timing", "layer_latency_table"),
    "residual_ties": ("squeezer.ties", "residual_ties"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        module, new = _MOVED[name]
        warnings.warn(
            f"squeezer.plan.{name} moved to {module}.{new}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), new)
    raise AttributeError(f"module 'squeezer.plan' has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Bits and sparsity under one budget

#: One joint choice: (weight bits, fraction of the layer's weights pruned by magnitude).
Choice = tuple[int, float]


@dataclass(frozen=True)
class JointPlan:
    """Per layer, the (bits, prune ratio) pair the joint ILP chose, with what it predicts."""

    choices: Mapping[str, Choice]
    omega: float
    size_bytes: float

    def bits(self) -> dict[str, int]:
        return {k: b for k, (b, _) in self.choices.items()}

    def ratios(self) -> dict[str, float]:
        return {k: r for k, (_, r) in self.choices.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"choices": {k: [b, r] for k, (b, r) in self.choices.items()},
                "omega": self.omega, "size_bytes": self.size_bytes}  # fmt: skip


def plan_joint(
    omega: Mapping[str, Mapping[Choice, float]],
    size_bytes: Mapping[str, Mapping[Choice, float]],
    max_bytes: float,
    *,
    fixed_bytes: float = 0.0,
    allowed: Callable[[Choice], bool] | None = None,
) -> JointPlan:
    """The (bits, prune ratio) per layer minimising ΣΩ under a size limit, solved exactly.

    Pruning is one more dimension of the same one-hot ILP as :func:`plan`: each layer's
    candidates are pairs, scored by :func:`squeezer.sensitivity.joint_sensitivity` and costed by
    :func:`squeezer.costs.joint_size_bytes` (sparse storage only where it is smaller). ``allowed``
    restricts the pairs, e.g. ``lambda c: c[1] == 0`` for a bits-only plan or
    ``lambda c: c[0] == 8`` for a prune-only plan at 8 bits, so the three are solved alike.

    Raises:
        InfeasibleBudgetError: no allowed choice fits ``max_bytes``; the message names the
            smallest size that does.

    Example:
        >>> om = {"a": {(8, 0.0): 0.0, (4, 0.0): 5.0, (8, 0.5): 1.0},
        ...       "b": {(8, 0.0): 0.0, (4, 0.0): 1.0, (8, 0.5): 4.0}}
        >>> sz = {k: {(8, 0.0): 100.0, (4, 0.0): 50.0, (8, 0.5): 60.0} for k in om}
        >>> plan_joint(om, sz, 110).choices
        {'a': (8, 0.5), 'b': (4, 0.0)}
    """
    layers = list(omega)
    if not layers:
        raise ConfigError("the joint sensitivity holds no layers")
    keep = allowed or (lambda c: True)
    choices = [tuple(c for c in omega[k] if keep(c)) for k in layers]
    empty = [k for k, c in zip(layers, choices, strict=True) if not c]
    if empty:
        raise ConfigError(f"no allowed (bits, ratio) choice for layers {empty[:3]}")
    obj = np.array([omega[k][c] for k, cs in zip(layers, choices, strict=True) for c in cs])
    coef = np.array([size_bytes[k][c] for k, cs in zip(layers, choices, strict=True) for c in cs])
    prog = _Program(layers, choices, obj)  # type: ignore[arg-type]
    prog.limit(coef, max_bytes - fixed_bytes)
    x = prog.solve()
    if x is None:
        least = fixed_bytes + sum(min(size_bytes[k][c] for c in cs)
                                  for k, cs in zip(layers, choices, strict=True))  # fmt: skip
        raise InfeasibleBudgetError(
            f"budget size={max_bytes:.0f}B cannot be met: the smallest allowed size is "
            f"{math.ceil(least)}B; raise it"
        )
    pick = prog.assignment(x)
    return JointPlan(
        choices={k: (int(c[0]), float(c[1])) for k, c in pick.items()},
        omega=float(sum(omega[k][c] for k, c in pick.items())),
        size_bytes=float(fixed_bytes + sum(size_bytes[k][c] for k, c in pick.items())),
    )
