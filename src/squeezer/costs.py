"""Cost tables: what each (layer, bit width) choice adds to each budget kind.

The planner (:mod:`squeezer.plan`) minimises the summed sensitivity subject to linear limits; the
coefficients of those limits are the per-layer, per-width costs collected here: storage in bytes
(scales, zero points and float bias included, as :mod:`squeezer.measure` counts them), MACs for bit
operations, and a measured latency table (:mod:`squeezer.layer_timing`). A :class:`Costs` is plain
data that round-trips through JSON, so re-planning a run needs no model at all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from . import measure
from .budget import BUDGET_KINDS
from .config import LayerQuant, Plan
from .errors import ConfigError
from .graph import quantizable_layers, split_attention, weight_channel_axis


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
            :func:`squeezer.plan.plan` gives every layer this setting with its chosen bits.
        templates: {FQN: LayerQuant} when layers are quantized differently (a per-layer template
            such as Q-BERT's); it takes precedence over ``template``.
        latency_edges: ``(a, b, ms)`` triples: the latency a plan adds when exactly one of layers
            ``a`` and ``b`` (neighbours in the graph) runs in float, i.e. the quantize/dequantize
            boundary between them (see :func:`squeezer.layer_timing.context_latency_costs`).

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
    templates: Mapping[str, LayerQuant] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    latency_edges: tuple[tuple[str, str, float], ...] = ()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def available(self, key: str) -> bool:
        """True if budgets of kind ``key`` (a key of :data:`squeezer.budget.BUDGET_KINDS`) apply."""
        if key not in BUDGET_KINDS:
            raise ConfigError(f"unknown budget kind {key!r}; known: {', '.join(BUDGET_KINDS)}")
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
        if key == "bops":  # a layer kept in float (bits ≥ 16) runs float activations too
            act = (self.act_bits or 32) if bits < 16 else 32
            return float(self.macs[fqn]) * bits * act  # type: ignore[index]
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
        total = self.fixed(key) + sum(self.cost(key, k, b) for k, b in bits.items())
        if key == "latency_ms":  # a boundary between a float and an integer neighbour
            total += sum(ms for a, b, ms in self.latency_edges
                         if a in bits and b in bits and (bits[a] >= 16) != (bits[b] >= 16))  # fmt: skip
        return total

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
            "templates": None
            if self.templates is None
            else {k: v.to_dict() for k, v in self.templates.items()},
            "meta": json.loads(json.dumps(dict(self.meta), default=str)),
            "latency_edges": [[a, b, float(ms)] for a, b, ms in self.latency_edges],
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
            templates=None
            if d.get("templates") is None
            else {k: LayerQuant.from_dict(v) for k, v in d["templates"].items()},
            meta=dict(d.get("meta", {})),
            latency_edges=tuple((a, b, float(ms)) for a, b, ms in d.get("latency_edges") or ()),
        )

    @classmethod
    def from_json(cls, text: str) -> Costs:
        return cls.from_dict(json.loads(text))


def plan_costs(
    model: nn.Module,
    bits: Sequence[int],
    *,
    example: Any = None,
    template: LayerQuant | Plan | None = None,
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
        template: the setting of every layer (granularity, activation bits; default 8-bit
            activations, per-channel weights), or a :class:`Plan` giving each layer its own (its
            widths are ignored).
        layers: FQNs to plan (default: every quantizable layer, or the template plan's layers).
        latency: a per-layer, per-bit table in ms
            (:func:`squeezer.layer_timing.layer_latency_table`) for latency budgets.
        fixed_latency_ms: latency outside the table (added to every plan).

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> c = plan_costs(net, (4, 8), example=torch.zeros(1, 16))
        >>> c.size_bytes["0"][4], c.macs["0"]
        (96.0, 128)
    """
    model = split_attention(model)  # the layers quantize() sees
    all_layers = quantizable_layers(model)
    per_layer = template if isinstance(template, Plan) else None
    if per_layer is not None:
        names = list(per_layer.layers) if layers is None else list(layers)
        tpl = {k: per_layer.layers[k] for k in names if k in per_layer.layers}
    else:
        names = list(all_layers) if layers is None else list(layers)
        one = LayerQuant(act_bits=8) if template is None else template
        tpl = dict.fromkeys(names, one)
    unknown = [k for k in names if k not in all_layers or k not in tpl]
    if unknown:
        raise ConfigError(f"layers {unknown[:3]} are not quantizable layers of the model")
    cand = sorted({int(b) for b in bits})
    axis = {k: weight_channel_axis(all_layers[k]) for k in names}
    def layer_bytes(k: str, b: int) -> float:
        """The layer's weight at ``b`` bits, with its input quantizer's scale and zero point (8
        bytes) unless it stays in float, as :func:`squeezer.measure.model_bytes` counts them."""
        spec = replace(tpl[k], bits=b)
        acts = 8 if b < 16 and spec.act_bits is not None else 0
        if isinstance(all_layers[k], nn.Embedding):
            acts = 0
        return measure.weight_bytes(all_layers[k].weight, spec, axis[k]) + acts

    size = {k: {b: layer_bytes(k, b) for b in cand} for k in names}
    ref_plan = Plan({k: replace(tpl[k], bits=8) for k in names})
    fixed_bytes = measure.model_bytes(model, ref_plan) - sum(layer_bytes(k, 8) for k in names)
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
                "measure it with squeezer.layer_timing.layer_latency_table(model, example, bits)"
            )
        latency = {k: {b: float(latency[k][b]) for b in cand} for k in names}
    return Costs(
        params={k: int(all_layers[k].weight.numel()) for k in names},
        size_bytes=size,
        macs=macs,
        latency_ms=latency,
        act_bits=_common_act_bits(tpl),
        fixed_bytes=float(fixed_bytes),
        fixed_bops=float(fixed_bops or 0.0),
        fixed_latency_ms=float(fixed_latency_ms),
        template=None if per_layer is not None else next(iter(tpl.values()), template),
        templates=tpl if per_layer is not None else None,
    )


def _common_act_bits(templates: Mapping[str, LayerQuant]) -> int | None:
    """The activation width BOPs count with: the one most layers use (layers without MACs, such as
    embeddings, may have none)."""
    counts: dict[int | None, int] = {}
    for t in templates.values():
        counts[t.act_bits] = counts.get(t.act_bits, 0) + 1
    with_acts = {k: v for k, v in counts.items() if k is not None}
    pool = with_acts or counts
    return max(pool, key=lambda k: pool[k]) if pool else None


def joint_size_bytes(
    model: nn.Module,
    layers: Sequence[str],
    bits: Sequence[int],
    ratios: Sequence[float],
    *,
    template: LayerQuant | None = None,
) -> dict[str, dict[tuple[int, float], float]]:
    """Bytes of each layer's weight at every (bit width, prune ratio): the cheaper of dense codes
    and sparse storage (the kept codes plus a one-bit-per-weight occupancy bitmap), scales as in
    :func:`squeezer.measure.weight_bytes`, plus the 8 bytes of an input quantizer below 16 bits.
    Sparse storage pays only where the ratio exceeds 1/b (at 4 bits: above 25% zeros), so a
    pruned layer is never counted smaller than a format could really store it.

    Example:
        >>> t = joint_size_bytes(nn.Sequential(nn.Linear(64, 8)), ["0"], (4,), (0.0, 0.5))
        >>> t["0"][4, 0.0], t["0"][4, 0.5]  # 512 codes: 256 B + 8 scales; half of them + 64 B bitmap
        (296.0, 232.0)
    """
    named = quantizable_layers(model)
    one = LayerQuant(act_bits=8) if template is None else template
    out: dict[str, dict[tuple[int, float], float]] = {}
    for k in layers:
        w = named[k].weight
        n = w.numel()
        row = {}
        for b in bits:
            spec = replace(one, bits=int(b))
            dense = measure.weight_bytes(w, spec, weight_channel_axis(named[k]))
            acts = 8 if b < 16 and spec.act_bits is not None else 0
            for r in ratios:
                removed = int(round(r * n))
                sparse = dense - removed * b / 8 + math.ceil(n / 8)
                row[int(b), float(r)] = min(dense, sparse) + acts
        out[k] = row
    return out
