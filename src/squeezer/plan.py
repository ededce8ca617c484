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
"""

from __future__ import annotations

import copy
import json
import math
import operator
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Budget, LayerQuant, Plan
from .errors import ConfigError, InfeasibleBudgetError
from .graph import QUANTIZABLE_TYPES, quantizable_layers, split_attention, weight_channel_axis
from .sensitivity import Sensitivity

#: Budget attribute -> (name in messages and --budget, unit suffix).
BUDGET_KEYS = {
    "size_bytes": ("size", "B"),
    "bits": ("bits", ""),
    "bops": ("bops", ""),
    "latency_ms": ("latency", "ms"),
}

Ties = Sequence[Sequence[str]]


# --------------------------------------------------------------------------------------------------
# Costs: what each (layer, bit width) choice costs under each budget kind


@dataclass(frozen=True)
class Costs:
    """Per-layer, per-bit costs the budgets are written in; plain data (JSON round trip).

    Attributes:
        params: {FQN: weight entries} of the planned layers (for the average weight bits).
        size_bytes: {FQN: {bits: bytes}}: the layer's storage at that width, scales, zero points and
            float bias included (``squeezer.measure``), or None if size budgets are not needed.
        macs: {FQN: multiply-accumulates per sample} for BOPs = MACs × weight bits × act bits.
        latency_ms: {FQN: {bits: ms}}, a measured per-layer table (see :func:`latency_table`).
        act_bits: activation bits used in BOPs (None: float activations, counted as 32).
        fixed_bytes: bytes of everything the plan does not choose (norms, float layers, buffers).
        fixed_bops: BOPs of the layers the plan does not choose (float, 32 × 32 bits).
        fixed_latency_ms: latency of everything outside the table.
        template: the LayerQuant the costs were computed for (granularity and scales change bytes);
            :func:`plan` gives every layer this setting with its chosen bits.

    Example:
        >>> c = Costs(params={"fc": 100}, size_bytes={"fc": {4: 58.0, 8: 108.0}}, fixed_bytes=10)
        >>> c.total("size_bytes", {"fc": 4}), c.total("bits", {"fc": 8})
        (68.0, 8.0)
    """

    params: Mapping[str, int]
    size_bytes: Mapping[str, Mapping[int, float]] | None = None
    macs: Mapping[str, int] | None = None
    latency_ms: Mapping[str, Mapping[int, float]] | None = None
    act_bits: int | None = 8
    fixed_bytes: float = 0.0
    fixed_bops: float = 0.0
    fixed_latency_ms: float = 0.0
    template: LayerQuant | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def available(self, key: str) -> bool:
        """True if budgets of kind ``key`` ("size_bytes", "bits", "bops", "latency_ms") apply."""
        return {
            "size_bytes": self.size_bytes is not None,
            "bits": True,
            "bops": self.macs is not None,
            "latency_ms": self.latency_ms is not None,
        }[key]

    def cost(self, key: str, fqn: str, bits: int) -> float:
        """What choosing ``bits`` for layer ``fqn`` adds to budget kind ``key``."""
        if key == "bits":
            return self.params[fqn] * bits / sum(self.params.values())
        if key == "bops":
            return float(self.macs[fqn]) * bits * (self.act_bits or 32)  # type: ignore[index]
        table = self.size_bytes if key == "size_bytes" else self.latency_ms
        try:
            return float(table[fqn][bits])  # type: ignore[index]
        except KeyError:
            raise ConfigError(
                f"the {key} cost table has no entry for layer {fqn!r} at {bits} bits; "
                "rebuild the costs with the same candidate bits as the sensitivity"
            ) from None

    def fixed(self, key: str) -> float:
        """The part of budget kind ``key`` no choice changes."""
        fixed = {
            "size_bytes": self.fixed_bytes,
            "bops": self.fixed_bops,
            "latency_ms": self.fixed_latency_ms,
        }
        return fixed.get(key, 0.0)

    def total(self, key: str, bits: Mapping[str, int]) -> float:
        """Value of budget kind ``key`` for a full assignment {FQN: bits} of the planned layers."""
        return self.fixed(key) + sum(self.cost(key, k, b) for k, b in bits.items())

    def to_dict(self) -> dict[str, Any]:
        def table(t: Mapping[str, Mapping[int, float]] | None) -> dict | None:
            if t is None:
                return None
            return {k: {str(b): float(v) for b, v in row.items()} for k, row in t.items()}

        return {
            "params": {k: int(v) for k, v in self.params.items()},
            "size_bytes": table(self.size_bytes),
            "macs": None if self.macs is None else {k: int(v) for k, v in self.macs.items()},
            "latency_ms": table(self.latency_ms),
            "act_bits": self.act_bits,
            "fixed_bytes": float(self.fixed_bytes),
            "fixed_bops": float(self.fixed_bops),
            "fixed_latency_ms": float(self.fixed_latency_ms),
            "template": None if self.template is None else self.template.to_dict(),
            "meta": json.loads(json.dumps(dict(self.meta), default=str)),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Costs:
        def table(t: Mapping[str, Mapping[str, float]] | None) -> dict | None:
            if t is None:
                return None
            return {k: {int(b): float(v) for b, v in row.items()} for k, row in t.items()}

        return cls(
            params={k: int(v) for k, v in d["params"].items()},
            size_bytes=table(d.get("size_bytes")),
            macs=None if d.get("macs") is None else {k: int(v) for k, v in d["macs"].items()},
            latency_ms=table(d.get("latency_ms")),
            act_bits=d.get("act_bits", 8),
            fixed_bytes=float(d.get("fixed_bytes", 0.0)),
            fixed_bops=float(d.get("fixed_bops", 0.0)),
            fixed_latency_ms=float(d.get("fixed_latency_ms", 0.0)),
            template=None if d.get("template") is None else LayerQuant.from_dict(d["template"]),
            meta=dict(d.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Costs:
        return cls.from_dict(json.loads(text))


def plan_costs(
    model: nn.Module,
    bits: Sequence[int],
    *,
    example: Any = None,
    template: LayerQuant | None = None,
    layers: Sequence[str] | None = None,
    latency: Mapping[str, Mapping[int, float]] | None = None,
    fixed_latency_ms: float = 0.0,
) -> Costs:
    """The :class:`Costs` of planning ``layers`` of ``model`` at ``bits``, from
    :mod:`squeezer.measure` (bytes with scales; MACs from one forward pass of ``example``).

    Sizes agree with ``measure.model_bytes(model, plan)`` for any plan of these layers made with
    ``template``; layers not planned stay in float and count in ``fixed_bytes``.

    Args:
        model: the float model (not modified).
        bits: candidate weight widths (the sensitivity's).
        example: one input batch; needed for BOPs budgets (None leaves ``macs`` unset).
        template: the per-layer setting (granularity, activation bits); default 8-bit activations,
            per-channel weights.
        layers: FQNs to plan (default: every quantizable layer).
        latency: a per-layer, per-bit table in ms (:func:`latency_table`) for latency budgets.
        fixed_latency_ms: latency outside the table (added to every plan).

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> c = plan_costs(net, (4, 8), example=torch.zeros(1, 16))
        >>> c.size_bytes["0"][4], c.macs["0"]
        (96.0, 128)
    """
    from . import measure

    template = LayerQuant(act_bits=8) if template is None else template
    model = split_attention(model)  # the layers quantize() sees
    all_layers = quantizable_layers(model)
    names = list(all_layers) if layers is None else list(layers)
    unknown = [k for k in names if k not in all_layers]
    if unknown:
        raise ConfigError(f"layers {unknown[:3]} are not quantizable layers of the model")
    cand = sorted({int(b) for b in bits})
    axis = {k: weight_channel_axis(all_layers[k]) for k in names}
    size = {
        k: {
            b: measure.weight_bytes(all_layers[k].weight, replace(template, bits=b), axis[k])
            for b in cand
        }
        for k in names
    }
    ref = replace(template, bits=8)
    ref_plan = Plan({k: ref for k in names})
    fixed_bytes = measure.model_bytes(model, ref_plan) - sum(
        measure.weight_bytes(all_layers[k].weight, ref, axis[k]) for k in names
    )
    macs = fixed_bops = None
    if example is not None:
        prof = measure.profile_layers(model, example)
        macs = {k: prof[k].macs for k in names}
        others = {k: p for k, p in prof.items() if k not in set(names)}
        fixed_bops = float(sum(measure.bops(others).values()))
    if latency is not None:
        missing = [k for k in names if k not in latency or any(b not in latency[k] for b in cand)]
        if missing:
            raise ConfigError(
                f"the latency table lacks layers or widths for {missing[:3]}; "
                "measure it with latency_table(model, example, bits)"
            )
        latency = {k: {b: float(latency[k][b]) for b in cand} for k in names}
    return Costs(
        params={k: int(all_layers[k].weight.numel()) for k in names},
        size_bytes=size,
        macs=macs,
        latency_ms=latency,
        act_bits=template.act_bits,
        fixed_bytes=float(fixed_bytes),
        fixed_bops=float(fixed_bops or 0.0),
        fixed_latency_ms=float(fixed_latency_ms),
        template=template,
    )


def latency_table(
    model: nn.Module,
    example: Any,
    bits: Sequence[int],
    *,
    backend: str = "onnxruntime",
    layers: Sequence[str] | None = None,
    runs: int = 50,
    threads: int = 1,
) -> dict[str, dict[int, float]]:
    """A per-layer, per-bit latency table in ms for latency budgets, timed on this CPU.

    Each layer runs alone on the input it sees when ``model`` runs ``example``.

    ``backend="onnxruntime"`` (measured): the layer is exported to ONNX and timed in ONNX Runtime
    in float32, and again after static QDQ quantization (u8 activations, s8 per-channel weights),
    which ORT runs with integer kernels. Widths ≥ 16 get the float time; widths ≤ 8 all get the
    int8 time, because ORT has no sub-byte kernels on CPU: on this hardware 2–8 bits cost the same.

    ``backend="proxy"`` (a model, not a measurement of low-bit kernels): the layer's float time in
    PyTorch, scaled by bits / 32, i.e. latency proportional to MACs × bits as on bit-serial
    hardware.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> t = latency_table(net, torch.zeros(4, 16), (4, 8, 32), backend="proxy", runs=3)
        >>> t["0"][4] < t["0"][8] < t["0"][32]
        True
    """
    from . import measure
    from .data import forward

    if backend not in ("onnxruntime", "proxy"):
        raise ConfigError(f"unknown latency backend {backend!r}; use 'onnxruntime' or 'proxy'")
    model = split_attention(model)  # the layers quantize() sees
    all_layers = quantizable_layers(model)
    names = list(all_layers) if layers is None else list(layers)
    inputs: dict[str, torch.Tensor] = {}

    def grab(fqn: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.setdefault(fqn, args[0].detach().clone())

        return hook

    handles = [all_layers[k].register_forward_pre_hook(grab(k)) for k in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, dict[int, float]] = {}
    for fqn in names:
        if fqn not in inputs:
            out[fqn] = {int(b): 0.0 for b in bits}  # not reached by the example
            continue
        layer, x = all_layers[fqn], inputs[fqn]
        if backend == "proxy":
            with torch.no_grad():
                t32 = measure.time_callable(lambda m=layer, x=x: m(x), runs=runs).median_ms
            out[fqn] = {int(b): t32 * min(int(b), 32) / 32 for b in bits}
        else:
            t32, t8 = _ort_layer_times(layer, x, runs=runs, threads=threads)
            out[fqn] = {int(b): (t32 if b >= 16 else t8) for b in bits}
    return out


def _ort_layer_times(
    layer: nn.Module, x: torch.Tensor, *, runs: int, threads: int
) -> tuple[float, float]:
    """Median ms of one layer in ONNX Runtime, float32 and static-QDQ int8."""
    import logging
    import tempfile
    from pathlib import Path

    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from . import measure

    class _One(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": x.numpy()}])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        f32, i8 = Path(tmp) / "f32.onnx", Path(tmp) / "i8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter takes ~0.3 s per layer here, the dynamo one ~6 s.
            torch.onnx.export(
                copy.deepcopy(layer).eval(), (x,), str(f32), dynamo=False,
                input_names=["x"], output_names=["y"],
            )  # fmt: skip
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint per call
        try:
            quantize_static(
                str(f32), str(i8), _One(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )  # fmt: skip
        finally:
            root.setLevel(level)
        times = []
        for path in (f32, i8):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            feed = {"x": x.numpy()}
            times.append(measure.time_callable(lambda s=sess, f=feed: s.run(None, f), runs=runs))
    return times[0].median_ms, times[1].median_ms


# --------------------------------------------------------------------------------------------------
# The integer program


@dataclass
class _Program:
    """One-hot ILP over (layer, bit) choices; rows are (indices, values, lower, upper)."""

    layers: list[str]
    choices: list[tuple[int, ...]]  # candidate bits per layer
    objective: np.ndarray
    rows: list[tuple[list[int], list[float], float, float]] = field(default_factory=list)
    upper: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.offset = np.cumsum([0] + [len(c) for c in self.choices])
        for i in range(len(self.layers)):  # exactly one width per layer
            idx = list(range(self.offset[i], self.offset[i + 1]))
            self.rows.append((idx, [1.0] * len(idx), 1.0, 1.0))
        self.upper = np.ones(int(self.offset[-1]))

    @property
    def n(self) -> int:
        return int(self.offset[-1])

    def var(self, i: int, bits: int) -> int:
        return int(self.offset[i]) + self.choices[i].index(bits)

    def limit(self, coef: np.ndarray, cap: float) -> None:
        """Σ coef·x ≤ cap, scaled so the row's largest coefficient is 1 (HiGHS tolerances are
        absolute, and byte or BOP counts run to 1e9)."""
        scale = float(np.abs(coef).max()) or 1.0
        nz = np.nonzero(coef)[0]
        self.rows.append((nz.tolist(), (coef[nz] / scale).tolist(), -math.inf, cap / scale))

    def solve(self, objective: np.ndarray | None = None) -> np.ndarray | None:
        """The optimal 0/1 vector, or None if infeasible (HiGHS, proven optimal)."""
        from .milp import Program

        obj = self.objective if objective is None else objective
        scale = float(np.abs(obj).max()) or 1.0
        prog = Program(cost=obj / scale, integer=[True] * self.n, upper=self.upper)
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
    return prog


def _coef(prog: _Program, costs: Costs, key: str) -> np.ndarray:
    return np.array(
        [costs.cost(key, k, b) for k, c in zip(prog.layers, prog.choices, strict=True) for b in c]
    )


def _extremes(
    costs: Costs, key: str, layers: Sequence[str], choices: Sequence[Sequence[int]]
) -> tuple[float, float]:
    """The budget kind's value with every layer at its lowest, and at its highest, width."""
    lo = costs.total(key, {k: min(c) for k, c in zip(layers, choices, strict=True)})
    hi = costs.total(key, {k: max(c) for k, c in zip(layers, choices, strict=True)})
    return lo, hi


def _limits(
    budget: Budget, sens: Sensitivity, costs: Costs, choices: Sequence[Sequence[int]]
) -> dict[str, float]:
    """{budget key: absolute limit}, resolving HAWQ-V3's relative values."""
    out = {}
    for key in BUDGET_KEYS:
        value = getattr(budget, key)
        if value is None:
            continue
        if not costs.available(key):
            raise ConfigError(
                f"a {BUDGET_KEYS[key][0]} budget needs {key} costs; build them with "
                "squeezer.plan.layer_costs(model, ..., example=...)"
                + (", latency=latency_table(...)" if key == "latency_ms" else "")
            )
        if key in budget.relative:
            lo, hi = _extremes(costs, key, sens.layers, choices)
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
    template: LayerQuant | None = None,
) -> Plan:
    """The bit width per layer that minimises ΣΩ under ``budget``, solved exactly (HiGHS ILP).

    Args:
        sensitivity: Ω per layer and bit width (:func:`squeezer.sensitivity.sensitivity`).
        budget: any combination of size, average bits, BOPs and latency; relative values allowed.
        costs: per-layer, per-bit costs (:func:`layer_costs`).
        ties: groups of FQNs that must share one width (:func:`residual_ties`).
        bits: restrict the candidate widths (default: the sensitivity's).
        pin: {FQN: bits} fixed choices (e.g. keep the first layer at 8 bits).
        template: the LayerQuant every planned layer copies, with ``bits`` replaced. Default:
            ``costs.template``, else the sensitivity's granularity, activations at costs.act_bits.

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
    limits = _limits(budget, sensitivity, costs, prog.choices)
    coefs = {key: _coef(prog, costs, key) for key in limits}
    for key, cap in limits.items():
        prog.limit(coefs[key], cap - costs.fixed(key))
    x = prog.solve()
    if x is None:
        raise InfeasibleBudgetError(
            _infeasible_message(sensitivity, costs, ties, bits, pin, budget)
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
    layers = {k: replace(template, bits=b) for k, b in assignment.items()}
    return Plan(layers, meta=meta)


def achieved(bits: Mapping[str, int], costs: Costs) -> dict[str, float]:
    """Size, average bits, BOPs and latency of an assignment {FQN: bits}, where costs allow.

    Example:
        >>> achieved({"fc": 4}, Costs(params={"fc": 10}))
        {'bits': 4.0}
    """
    return {key: costs.total(key, bits) for key in BUDGET_KEYS if costs.available(key)}


def _template(sens: Sensitivity, costs: Costs, template: LayerQuant | None) -> LayerQuant:
    if template is None:
        template = costs.template
    if template is None:
        return LayerQuant(
            bits=8,
            granularity=sens.granularity,
            group_size=sens.group_size,
            symmetric=bool(sens.meta.get("symmetric", True)),
            observer=str(sens.meta.get("observer", "minmax")),
            act_bits=costs.act_bits,
        )
    if (template.granularity, template.group_size) != (sens.granularity, sens.group_size):
        raise ConfigError(
            f"the plan quantizes weights per {template.granularity} but the sensitivity was "
            f"computed per {sens.granularity}; recompute it with granularity="
            f"{template.granularity!r} (and the same group_size)"
        )
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
    return template


def _infeasible_message(
    sens: Sensitivity,
    costs: Costs,
    ties: Ties,
    bits: Sequence[int] | None,
    pin: Mapping[str, int],
    budget: Budget,
) -> str:
    """Name the first limit that cannot be met even at its own minimum under the other limits."""
    prog0 = _build(sens, costs, ties, bits, pin)
    limits = _limits(budget, sens, costs, prog0.choices)
    for key in limits:
        prog = _build(sens, costs, ties, bits, pin)
        for other, cap in limits.items():
            if other != key:
                prog.limit(_coef(prog, costs, other), cap - costs.fixed(other))
        coef = _coef(prog, costs, key)
        x = prog.solve(objective=coef)
        if x is None:
            continue  # the other limits are infeasible on their own; report one of them
        best = costs.fixed(key) + float(coef @ x)
        name, unit = BUDGET_KEYS[key]
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
    if key not in BUDGET_KEYS:
        raise ConfigError(f"unknown frontier key {key!r}; choose one of {', '.join(BUDGET_KEYS)}")
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


# --------------------------------------------------------------------------------------------------
# Ties from the graph


_ADD_TARGETS = (operator.add, operator.iadd, torch.add)
#: Modules and ops an add input may pass through and still count as the layer's output: batch
#: norm folds into the layer, the rest only move or drop values. A nonlinearity (ReLU, ...) stops
#: the walk: its output is requantized on its own.
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.Unflatten,
)
_PASS_OPS = {
    "view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
    "dropout", "batch_norm", "float", "to", "clone",
}  # fmt: skip


def residual_ties(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Groups of quantizable layers whose outputs meet at one residual add (HAWQ-V3 ties them so the
    integer add sees one scale). Found by ``torch.fx`` tracing; an untraceable model gets no ties
    (with a warning).

    A layer feeds an add if the path from its output to the add passes only through batch norm,
    identity, dropout and reshapes (an activation function ends the path). Groups sharing a layer
    are merged. In a ResNet this ties the block's last convolution to its downsampling shortcut.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        ...         self.bn = nn.BatchNorm1d(4)
        ...     def forward(self, x):
        ...         return torch.relu(self.bn(self.a(x)) + self.b(x))
        >>> residual_ties(Block())
        (('a', 'b'),)
    """
    import torch.fx as fx

    from .attention import SplitAttention

    class Tracer(fx.Tracer):
        # Split attention stays one opaque call (as fx keeps nn.MultiheadAttention): its forward
        # branches on its inputs' shapes, which symbolic tracing cannot follow.
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, SplitAttention) or super().is_leaf_module(m, qualname)

    try:
        gm = fx.GraphModule(model, Tracer().trace(model))
    except Exception as exc:  # fx raises many types on data-dependent control flow
        warnings.warn(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}); "
            "planning without residual ties",
            stacklevel=2,
        )
        return ()
    modules = dict(gm.named_modules())

    def producer(node: Any) -> str | None:
        while isinstance(node, fx.Node):
            if node.op == "call_module":
                m = modules[str(node.target)]
                if type(m) in QUANTIZABLE_TYPES:
                    return str(node.target)
                if not isinstance(m, _PASS_MODULES):
                    return None
            elif node.op in ("call_function", "call_method"):
                name = node.target if isinstance(node.target, str) else node.target.__name__
                if name not in _PASS_OPS:
                    return None
            else:
                return None
            ins = [a for a in _flat_args(node) if isinstance(a, fx.Node)]
            if len(ins) != 1:
                return None
            node = ins[0]
        return None

    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        feeders = sorted({p for p in (producer(a) for a in _flat_args(node)) if p is not None})
        for other in feeders[1:]:
            parent[find(other)] = find(feeders[0])
    order = {k: i for i, k in enumerate(quantizable_layers(model))}
    groups: dict[str, list[str]] = {}
    for k in parent:
        groups.setdefault(find(k), []).append(k)
    out = [tuple(sorted(g, key=lambda k: order.get(k, 0))) for g in groups.values() if len(g) > 1]
    return tuple(sorted(out, key=lambda g: order.get(g[0], 0)))


def _is_add(node: Any) -> bool:
    return (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _flat_args(node: Any) -> Iterable[Any]:
    for a in (*node.args, *node.kwargs.values()):
        if isinstance(a, tuple | list):
            yield from a
        else:
            yield a
