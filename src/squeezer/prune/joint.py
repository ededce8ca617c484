"""Structured channel ratios and bit widths as candidates of one plan (issue 13).

The channel groups are the dependency graph's (:mod:`squeezer.prune.depgraph`): channels that share
the same layers (one conv's filters, a residual stream). Each group may lose a fraction of its
channels, its least important first (L1 or Hessian score, :func:`~.structured.channel_scores`),
rounded to whole multiples of ``round_to`` channels as structured pruning does; each layer then
has one configuration per (bits, ratio of its output group, ratio of its input group), and
:func:`squeezer.plan_joint.plan_structured` picks them under size and latency limits together.

Per configuration the table holds:

- **size**: the bytes of the really smaller layer (kept outputs × kept inputs at that width, scales
  and bias as :func:`squeezer.measure.model_bytes` counts them) and, per group, its BatchNorm
  entries; the sum over a choice equals ``model_bytes`` of the pruned, quantized model;
- **latency**: the smaller layer timed alone in ONNX Runtime at the table's batch
  (:func:`squeezer.layer_timing.layer_latency_table`, the one per-layer timing path);
- **Ω**: ``"hessian"``: ½·Tr(H_l)/n_l·‖Q_b(M⊙W_l) − W_l‖², the removed channels' weights (their
  filters and input slices) plus the quantization error of what is kept, the issue's second-order
  estimate; ``"measured"``: the loss increase measured on the analysis samples with layer l's
  removed *input* slices zeroed (what removing those channels does exactly: the masked-model
  oracle of :func:`~.structured.masked`) and its kept weights quantized, everything else float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import LayerQuant, Plan
from ..data import Dataset, mean_loss
from ..errors import ConfigError
from ..graph import quantizable_layers, weight_channel_axis
from ..measure import model_bytes, weight_bytes
from ..plan_joint import Config, JointChoice, JointTable
from ..quant.primitives import quantize_weight
from .base import Pruned, PruneSpec
from .depgraph import DependencyGraph, Use
from .structured import _groups, _rounded, _smaller, channel_scores, shrink, traced_graph

#: The candidate ratios of a group when none are asked for.
DEFAULT_RATIOS = (0.0, 0.25, 0.5)


@dataclass
class JointSpace:
    """The channel groups of a model, what each ratio removes, and each layer's two axes.

    Attributes:
        model: the traced eval copy (its modules are the graph's).
        graph: the dependency graph.
        removal: per group, per candidate ratio, the channel elements removed.
        layers: per quantizable layer, (output group, input group), None where not pruned.
        axes: per layer, the graph uses of its output and input axes (None where untraced).
    """

    model: nn.Module
    graph: DependencyGraph
    removal: dict[str, dict[float, frozenset[int]]]
    layers: dict[str, tuple[str | None, str | None]]
    axes: dict[str, tuple[Use | None, Use | None]]

    def ratios(self, group: str | None) -> tuple[float, ...]:
        return (0.0,) if group is None else tuple(self.removal[group])

    def configs(self, fqn: str, bits: Sequence[int]) -> list[Config]:
        """Every (bits, out ratio, in ratio) of a layer (a depthwise conv's two are one group)."""
        og, ig = self.layers[fqn]
        pairs = [(ro, ri) for ro in self.ratios(og) for ri in self.ratios(ig)
                 if og is None or og != ig or ro == ri]  # fmt: skip
        return [(int(b), ro, ri) for b in bits for ro, ri in pairs]

    def depthwise(self, fqn: str) -> bool:
        og, ig = self.layers[fqn]
        return og is not None and og == ig

    def removed(self, groups: Mapping[str, float]) -> set[int]:
        """The channel elements a choice of ratio per group removes."""
        out: set[int] = set()
        for g, r in groups.items():
            out |= self.removal[g][r]
        return out

    def kept(self, fqn: str, ro: float, ri: float) -> tuple[list[int] | None, list[int] | None]:
        """The kept output and input indices of a layer at (ro, ri) (None: the whole axis)."""
        (og, ig), (ou, iu) = self.layers[fqn], self.axes[fqn]
        out = None if og is None else _keep(self.graph.uses[ou], self.removal[og][ro])
        inp = None if ig is None else _keep(self.graph.uses[iu], self.removal[ig][ri])
        return out, inp


def _keep(elems: list[int], removed: frozenset[int]) -> list[int]:
    return [i for i, e in enumerate(elems) if e not in removed]


def joint_space(
    model: nn.Module,
    example: Any,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    round_to: int = 8,
    importance: str = "l1",
    traces: Mapping[str, float] | None = None,
    skip: tuple[str, ...] = (),
) -> JointSpace:
    """The groups and per-ratio removals of ``model`` (not modified) traced on ``example``.

    A group whose channels share a layer axis with another group (or with pinned channels) is
    left whole, so each layer's output and input axis belongs to at most one group.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
        >>> s = joint_space(net, torch.zeros(2, 1, 8, 8))
        >>> s.layers, s.ratios("0")
        ({'0': ('0', None), '2': (None, '0')}, (0.0, 0.5))
    """
    if any(not 0 <= r < 1 for r in ratios) or 0.0 not in ratios:
        raise ConfigError(f"joint prune ratios must lie in [0, 1) and include 0, got {list(ratios)}")
    work, graph = traced_graph(model, example, skip)
    scores = channel_scores(graph, importance, dict(traces) if traces is not None else None)
    members = _groups(scores, graph)
    of: dict[int, int] = {e: i for i, m in enumerate(members) for e in m}
    named = quantizable_layers(work)

    def axis(fqn: str, roles: tuple[str, ...]) -> Use | None:
        return next((Use(fqn, r) for r in roles if Use(fqn, r) in graph.uses), None)

    axes = {k: (axis(k, ("out", "depthwise")), axis(k, ("in", "depthwise"))) for k in named}
    whole: set[int] = set()  # groups sharing an axis with another group or pinned channels
    for use in (u for pair in axes.values() for u in pair if u is not None):
        ids = {of.get(e) for e in graph.uses[use]}
        if len(ids) > 1:
            whole |= ids - {None}
    names = {}
    for i, m in enumerate(members):
        producers = sorted({u.fqn for u in graph.channels()[m[0]] if u.role in ("out", "depthwise")})
        base = producers[0] + (f"+{len(producers) - 1}" if len(producers) > 1 else "")
        names[i] = base if base not in names.values() else f"{base}#{i}"
    removal: dict[str, dict[float, frozenset[int]]] = {}
    for i, m in enumerate(members):
        if i in whole:
            continue
        n, row = len(m), {}
        for r in sorted(ratios):
            kept = _rounded(n - int(round(r * n)), n, round_to)
            eff = round(1 - kept / n, 6)
            row.setdefault(eff, frozenset(m[: n - kept]))
        if len(row) > 1:
            removal[names[i]] = row

    def group(use: Use | None) -> str | None:
        if use is None:
            return None
        ids = {of.get(e) for e in graph.uses[use]}
        g = names.get(next(iter(ids))) if len(ids) == 1 else None
        return g if g in removal else None

    layers = {k: (group(o), group(i)) for k, (o, i) in axes.items()}
    return JointSpace(work, graph, removal, layers, axes)


def _shrunk_weight(space: JointSpace, fqn: str, ro: float, ri: float) -> torch.Tensor:
    w = quantizable_layers(space.model)[fqn].weight.detach()
    out, inp = space.kept(fqn, ro, ri)
    if space.depthwise(fqn):
        return w[out]  # depthwise: one index for filter, input and group
    if out is not None:
        w = w[out]
    return w if inp is None else w[:, inp]


def _quantized(w: torch.Tensor, spec: LayerQuant, layer: nn.Module) -> torch.Tensor:
    if spec.is_float:
        return w
    wq, _ = quantize_weight(w, spec.bits, granularity=spec.granularity, group_size=spec.group_size,
                            symmetric=spec.symmetric, observer=spec.observer,
                            channel_axis=weight_channel_axis(layer))  # fmt: skip
    return wq.reshape(w.shape)


def omega_hessian(
    space: JointSpace, traces: Mapping[str, float], bits: Sequence[int], template: LayerQuant
) -> dict[str, dict[Config, float]]:
    """½·Tr(H_l)/n_l·(‖removed weights‖² + ‖Q_b(kept) − kept‖²) per layer and configuration."""
    named = quantizable_layers(space.model)
    out: dict[str, dict[Config, float]] = {}
    for fqn, layer in named.items():
        w = layer.weight.detach().double()
        avg = 0.5 * max(float(traces.get(fqn, 0.0)), 0.0) / w.numel()
        row = {}
        for c in space.configs(fqn, bits):
            kept = _shrunk_weight(space, fqn, c[1], c[2]).double()
            q = _quantized(kept.float(), replace(template, bits=c[0]), layer).double()
            gone = float(w.pow(2).sum() - kept.pow(2).sum())
            row[c] = avg * (max(gone, 0.0) + float((q - kept).pow(2).sum()))
        out[fqn] = row
    return out


def omega_measured(
    space: JointSpace, data: Dataset, bits: Sequence[int], template: LayerQuant, *,
    samples: int = 512, seed: int = 0,
) -> dict[str, dict[Config, float]]:  # fmt: skip
    """The measured loss increase per layer and configuration: layer l alone with its removed
    input slices zeroed and its kept weights quantized, on ``samples`` analysis samples."""
    batches = list(data.analysis_batches(samples, seed=seed))
    net = space.model
    base = mean_loss(net, batches, data.task)
    out: dict[str, dict[Config, float]] = {}
    for fqn, layer in quantizable_layers(net).items():
        orig = layer.weight.detach().clone()
        row = {}
        for c in space.configs(fqn, bits):
            ko, ki = space.kept(fqn, c[1], c[2])
            depthwise = space.depthwise(fqn)
            w = orig.clone()
            rows = list(range(w.shape[0])) if ko is None else ko
            if ki is not None and not depthwise:
                w[:, [i for i in range(w.shape[1]) if i not in set(ki)]] = 0
                cols = ki
            else:
                cols = list(range(w.shape[1]))
            kept = w[rows][:, cols]
            q = _quantized(kept, replace(template, bits=c[0]), layer)
            w[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = q
            with torch.no_grad():
                layer.weight.copy_(w)
            row[c] = mean_loss(net, batches, data.task) - base
        with torch.no_grad():
            layer.weight.copy_(orig)
        out[fqn] = row
    return out


def size_rows(
    space: JointSpace, bits: Sequence[int], template: LayerQuant
) -> tuple[dict[str, dict[Config, float]], dict[str, dict[float, float]], float]:
    """Bytes per layer and configuration, per group and ratio (its BatchNorm entries), and the
    rest of the model (fixed): a choice's sum is ``model_bytes`` of the pruned, quantized model."""
    named = quantizable_layers(space.model)
    layers: dict[str, dict[Config, float]] = {}
    for fqn, layer in named.items():
        row = {}
        for c in space.configs(fqn, bits):
            spec = replace(template, bits=c[0])
            w = _shrunk_weight(space, fqn, c[1], c[2])
            kept_out = w.shape[weight_channel_axis(layer)]
            b = getattr(layer, "bias", None)
            bias = 0 if b is None else kept_out * b.element_size()
            acts = 8 if not spec.is_float and spec.act_bits is not None else 0
            row[c] = weight_bytes(w, spec, weight_channel_axis(layer)) + bias + acts
        layers[fqn] = row
    # A group's ratio saves the BatchNorm entries of the channels it removes (negative bytes).
    groups = {g: {r: 0.0 for r in rem} for g, rem in space.removal.items()}
    for use, elems in space.graph.uses.items():
        if use.role != "norm":
            continue
        bn = space.graph.modules[use.fqn]
        per = sum(t.element_size() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
                  if t is not None)  # fmt: skip
        for g, rem in space.removal.items():
            for r, gone in rem.items():
                groups[g][r] -= per * sum(e in gone for e in elems)
    plan = Plan({k: replace(template, bits=max(bits)) for k in named})
    dense = model_bytes(space.model, plan)
    top = max(bits)
    fixed = dense - sum(layers[k][top, 0.0, 0.0] for k in named)
    return layers, groups, fixed


def latency_rows(
    space: JointSpace, example: Any, bits: Sequence[int], *, threads: int = 1, runs: int = 30,
) -> dict[str, dict[Config, float]]:  # fmt: skip
    """Milliseconds per layer and configuration: the smaller layer alone in ONNX Runtime (int8
    QDQ for widths ≤ 8, float otherwise) on its input at ``example``'s batch."""
    from ..layer_timing import layer_latency_table

    named = quantizable_layers(space.model)
    inputs: dict[str, tuple[int, ...]] = {}

    def seen(fqn: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:  # returns None: output unchanged
            inputs.setdefault(fqn, tuple(inp[0].shape))

        return hook

    hooks = [m.register_forward_hook(seen(k)) for k, m in named.items()]
    try:
        with torch.no_grad():
            space.model(example)
    finally:
        for h in hooks:
            h.remove()
    widths = sorted({8 if b < 16 else 32 for b in bits})
    out: dict[str, dict[Config, float]] = {}
    for fqn, layer in named.items():
        times: dict[tuple[float, float], dict[int, float]] = {}
        for c in space.configs(fqn, bits):
            if (c[1], c[2]) in times:
                continue
            ko, ki = space.kept(fqn, c[1], c[2])
            depthwise = space.depthwise(fqn)
            roles = {"depthwise": ko} if depthwise else {
                k: v for k, v in (("out", ko), ("in", ki)) if v is not None}  # fmt: skip
            with torch.no_grad():
                small = _smaller(layer, roles)[0] if roles else layer
            shape = list(inputs.get(fqn, ()))
            if not shape:
                times[c[1], c[2]] = {w: 0.0 for w in widths}
                continue
            ax = -1 if isinstance(layer, nn.Linear) else 1
            shape[ax] = getattr(small, "in_features", None) or small.in_channels
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            t = layer_latency_table(nn.Sequential(small), x, widths, layers=["0"], runs=runs,
                                    threads=threads)["0"]  # fmt: skip
            times[c[1], c[2]] = t
        out[fqn] = {c: times[c[1], c[2]][8 if c[0] < 16 else 32] for c in space.configs(fqn, bits)}
    return out


def joint_table(
    space: JointSpace,
    omega: Mapping[str, Mapping[Config, float]],
    bits: Sequence[int],
    template: LayerQuant,
    *,
    latency: Mapping[str, Mapping[Config, float]] | None = None,
    whole_latency_ms: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> JointTable:
    """The :class:`~squeezer.plan_joint.JointTable` of a space: Ω, sizes and, with ``latency``
    and the measured latency of the dense model at the widest bits (``whole_latency_ms``), a
    latency row whose fixed part makes that model predicted at exactly its measurement."""
    layers, groups, fixed = size_rows(space, bits, template)
    costs = {"size_bytes": layers}
    fixed_costs = {"size_bytes": fixed}
    if latency is not None:
        if whole_latency_ms is None:
            raise ConfigError("a latency table needs the dense model's measured latency")
        costs["latency_ms"] = {k: dict(v) for k, v in latency.items()}
        top = max(bits)
        fixed_costs["latency_ms"] = whole_latency_ms - sum(v[top, 0.0, 0.0] for v in latency.values())
    return JointTable(
        groups={g: tuple(r) for g, r in space.removal.items()},
        layers=dict(space.layers),
        omega={k: dict(v) for k, v in omega.items()},
        costs=costs,
        group_costs={"size_bytes": groups},
        fixed=fixed_costs,
        meta=dict(meta or {}),
    )


def apply_choice(model: nn.Module, space: JointSpace, choice: JointChoice, spec: PruneSpec) -> Pruned:
    """A copy of ``model`` with the channels the choice removes really gone (``model`` untouched)."""
    removed = space.removed(choice.groups)
    pruned, arch = shrink(model, space.graph, removed)
    pruned.train(model.training)
    old = quantizable_layers(model)
    ratios = {k: 1.0 - m.weight.numel() / old[k].weight.numel()
              for k, m in quantizable_layers(pruned).items()}  # fmt: skip
    stats = {
        "params_before": float(sum(p.numel() for p in model.parameters())),
        "params_after": float(sum(p.numel() for p in pruned.parameters())),
        "channels_removed": float(len(removed)),
        "channels_prunable": float(len(space.graph.channels())),
    }
    return Pruned(pruned, spec, ratios, arch, stats)


def bits_plan(model: nn.Module, choice: JointChoice, template: LayerQuant) -> Plan:
    """The quantization plan of a choice: each layer at its chosen width, as ``template``."""
    names = set(quantizable_layers(model))
    layers = {k: replace(template, bits=b) for k, b in choice.bits().items() if k in names}
    bits = sum(layers[k].bits for k in layers) / max(len(layers), 1)
    return Plan(layers, meta={"method": "joint", "name": "joint bits+prune",
                              "predicted_omega": choice.omega, "mean_bits": bits})  # fmt: skip
