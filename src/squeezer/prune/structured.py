"""Structured channel pruning that removes channels for real.

The dependency graph (:mod:`squeezer.prune.depgraph`) gives the coupled channels; each is scored
(L1 or L2 magnitude of every weight it owns, or the second-order estimate ½·Tr(H_l)/n_l·‖ΔW_l‖²
summed over the layers it touches, with per-layer Hessian traces from
:func:`squeezer.spectrum.analyze_dataset`, as HAWQ-V2 scores a quantization perturbation); the
lowest go until the model's MACs (or weights) fall to the target. The result is a plain smaller
model: its Conv, BatchNorm and Linear layers are new, smaller layers of the same types, holding the
kept slices of the original weights. :func:`rebuild` makes the same shapes from a recorded
``architecture``, so a run folder reloads the pruned model from its factory plus its weights.

Scores are normalised within each group of channels that share the same layers (a residual
stream, one conv's filters) before they are compared across groups, since raw magnitudes differ
from layer to layer; every group keeps at least one channel.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from ..data import Dataset
from ..errors import ConfigError
from ..graph import copy_model, quantizable_layers, set_module
from ..measure import profile_layers
from .base import Pruned, PruneSpec
from .depgraph import DependencyGraph, Use, build


def channel_scores(
    graph: DependencyGraph, importance: str = "l1", traces: dict[str, float] | None = None
) -> dict[int, float]:
    """Per prunable channel, its importance (higher = keep).

    ``"l1"``/``"l2"``: the L1 norm / squared L2 norm of every weight and BatchNorm scale the
    channel owns (its filters, its input slices, its norm entries). ``"hessian"``:
    Σ_l ½·(Tr(H_l)/n_l)·‖ΔW_l‖² over the layers it touches, ``traces`` giving Tr(H_l) per layer.
    """
    if importance == "hessian" and traces is None:
        raise ConfigError("Hessian importance needs the per-layer traces (pass data)")
    scores: dict[int, float] = {}
    for e, uses in graph.channels().items():
        total = 0.0
        for use, idx in uses.items():
            mod = graph.modules[use.fqn]
            w = _owned(mod, use.role, idx)
            if importance == "l1":
                total += float(w.abs().sum())
            elif use.role != "norm" or importance == "l2":
                sq = float((w * w).sum())
                if importance == "hessian":
                    n = mod.weight.numel()
                    sq *= 0.5 * max(traces.get(use.fqn, 0.0), 0.0) / n
                total += sq
        scores[e] = total
    return scores


def _owned(mod: nn.Module, role: str, idx: list[int]) -> torch.Tensor:
    w = mod.weight.detach()
    if role == "in":
        return w[:, idx] if not isinstance(mod, nn.Linear) else w[:, idx]
    return w[idx]


def _layer_costs(model: nn.Module, graph: DependencyGraph, example: Any) -> dict[str, float]:
    """Per-sample MACs of every layer (those the graph does not touch included)."""
    return {k: float(v.macs) for k, v in profile_layers(model, example[:1]).items()}


class _Counter:
    """MACs and weights of the model as a function of the channels removed (exact: a layer's MACs
    and weights scale with its kept inputs times its kept outputs)."""

    def __init__(self, model: nn.Module, graph: DependencyGraph, example: Any) -> None:
        self.macs = _layer_costs(model, graph, example)
        self.params = {k: float(m.weight.numel()) for k, m in quantizable_layers(model).items()}
        self.axes: dict[str, dict[str, Counter]] = {}
        self.size: dict[Use, int] = {}
        for use, el in graph.uses.items():
            self.axes.setdefault(use.fqn, {})[use.role] = Counter(el)
            self.size[use] = len(el)

    def total(self, removed: set[int], what: str) -> float:
        base = self.macs if what == "macs" else self.params
        total = 0.0
        for fqn, cost in base.items():
            frac = 1.0
            for role, counts in self.axes.get(fqn, {}).items():
                if role == "norm":
                    continue
                n = self.size[Use(fqn, role)]
                frac *= (n - sum(c for e, c in counts.items() if e in removed)) / n
            total += cost * frac
        return total


def _groups(scores: dict[int, float], graph: DependencyGraph) -> list[list[int]]:
    """Channels that share the same layers (one conv's filters, a residual stream), each group
    sorted from least to most important."""
    groups: dict[frozenset, list[int]] = {}
    for e, uses in graph.channels().items():
        groups.setdefault(frozenset(uses), []).append(e)
    return [sorted(m, key=lambda e: (scores[e], e)) for m in groups.values()]


def _order(scores: dict[int, float], groups: list[list[int]], scope: str) -> list[int]:
    """Channels in the order they are removed; each group's best channel is never listed.
    ``"global"``: by score over the group's mean score; ``"layer"``: by rank within the group
    (every group loses the same fraction)."""
    keyed: list[tuple[float, int]] = []
    for members in groups:
        mean = sum(scores[e] for e in members) / len(members) or 1.0
        for rank, e in enumerate(members[:-1]):
            key = (rank + 1) / len(members) if scope == "layer" else scores[e] / mean
            keyed.append((key, e))
    return [e for _, e in sorted(keyed)]


def _rounded(kept: int, n: int, step: int) -> int:
    """``kept`` moved to the nearest multiple of ``step`` (at least ``step``; a whole group
    stays whole; a group no larger than ``step`` is not pruned)."""
    if step <= 1 or kept == n:
        return kept
    if n <= step:
        return n
    return min(n, max(step, int(kept / step + 0.5) * step))


def _removal(order: list[int], k: int, groups: list[list[int]], step: int) -> set[int]:
    """The first ``k`` channels of ``order``, each group's count then rounded to ``step``."""
    first = set(order[:k])
    out: set[int] = set()
    for members in groups:
        gone = sum(e in first for e in members)
        if gone:
            n = len(members)
            out.update(members[: n - _rounded(n - gone, n, step)])
    return out


def select(
    graph: DependencyGraph, counter: _Counter, scores: dict[int, float], spec: PruneSpec
) -> set[int]:
    """The fewest lowest-scored channels whose removal brings the target down by ``spec.ratio``
    (each group keeping a multiple of ``spec.round_to`` channels)."""
    what = "macs" if spec.target == "macs" else "params"
    goal = (1.0 - spec.ratio) * counter.total(set(), what)
    groups = _groups(scores, graph)
    order = _order(scores, groups, spec.scope)

    k = fewest(order, groups, spec.round_to, lambda r: counter.total(r, what), goal)
    if k is None:
        reach = 1 - counter.total(_removal(order, len(order), groups, spec.round_to), what) / (
            counter.total(set(), what)
        )
        raise ConfigError(
            f"structured pruning can remove at most {reach:.0%} of the {what} of this model "
            f"(pinned channels and {spec.round_to} channel(s) per group stay); ask for less, or "
            "a smaller round_to"
        )
    return _removal(order, k, groups, spec.round_to)


def fewest(
    order: list[int], groups: list[list[int]], step: int, cost: Any, goal: float
) -> int | None:
    """The smallest ``k`` whose :func:`_removal` of the first ``k`` channels of ``order`` costs
    ``goal`` or less (``cost(removed)``, falling as ``k`` grows); None if even all of them do
    not."""
    lo, hi = 0, len(order)
    if cost(_removal(order, hi, groups, step)) > goal + 1e-9:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(_removal(order, mid, groups, step)) <= goal + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return lo


def shrink(model: nn.Module, graph: DependencyGraph, removed: set[int]) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose layers keep only the channels not ``removed``; and the changed
    constructor arguments per layer (the ``architecture``)."""
    out = copy_model(model)
    keep = graph.keep(removed)
    by_module: dict[str, dict[str, list[int]]] = {}
    for use, idx in keep.items():
        by_module.setdefault(use.fqn, {})[use.role] = idx
    arch: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for fqn, roles in by_module.items():
            old = out.get_submodule(fqn)
            new, changed = _smaller(old, roles)
            if changed:
                set_module(out, fqn, new)
                arch[fqn] = changed
    return out, arch


def _smaller(old: nn.Module, roles: dict[str, list[int]]) -> tuple[nn.Module, dict[str, int]]:
    if isinstance(old, nn.modules.batchnorm._BatchNorm):
        idx = roles["norm"]
        if len(idx) == old.num_features:
            return old, {}
        new = _resized(old, {"num_features": len(idx)})
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(old, name, None) is not None:
                getattr(new, name).copy_(getattr(old, name)[idx])
        if old.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
        return new, {"num_features": len(idx)}
    w = old.weight
    if "depthwise" in roles:
        idx = roles["depthwise"]
        out_idx, in_idx = idx, list(range(w.shape[1]))
        changed = {"in_channels": len(idx), "out_channels": len(idx), "groups": len(idx)}
    else:
        out_idx = roles.get("out", list(range(w.shape[0])))
        in_idx = roles.get("in", list(range(w.shape[1])))
        names = ("out_features", "in_features") if isinstance(old, nn.Linear) else (
            "out_channels", "in_channels")  # fmt: skip
        changed = {names[0]: len(out_idx), names[1]: len(in_idx)}
    if len(out_idx) == w.shape[0] and len(in_idx) == w.shape[1]:
        return old, {}
    new = _resized(old, changed)
    new.weight.copy_(w[out_idx][:, in_idx])
    if old.bias is not None:
        new.bias.copy_(old.bias[out_idx])
    return new, changed


def _resized(old: nn.Module, changed: dict[str, int]) -> nn.Module:
    """A new module of ``old``'s type and settings with the ``changed`` constructor arguments."""
    if isinstance(old, nn.modules.batchnorm._BatchNorm):
        kw = dict(eps=old.eps, momentum=old.momentum, affine=old.affine,
                  track_running_stats=old.track_running_stats)  # fmt: skip
        kw["num_features"] = changed.get("num_features", old.num_features)
    elif isinstance(old, nn.Linear):
        kw = dict(in_features=old.in_features, out_features=old.out_features,
                  bias=old.bias is not None)  # fmt: skip
        kw.update(changed)
    elif isinstance(old, nn.modules.conv._ConvNd):
        kw = dict(in_channels=old.in_channels, out_channels=old.out_channels,
                  kernel_size=old.kernel_size, stride=old.stride, padding=old.padding,
                  dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                  padding_mode=old.padding_mode)  # fmt: skip
        kw.update(changed)
    else:
        raise ConfigError(f"cannot resize a {type(old).__name__}")
    p = next(old.parameters(), None)
    new = type(old)(**kw)
    return new.to(p.dtype if p is not None else torch.float32)


def rebuild(model: nn.Module, architecture: dict[str, dict[str, int]]) -> nn.Module:
    """A copy of ``model`` with each layer named in ``architecture`` replaced by a fresh layer of
    the recorded shape (weights to be loaded after): how a pruned run folder is reloaded.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> rebuild(net, {"0": {"out_features": 3}, "2": {"in_features": 3}})[2]
        Linear(in_features=3, out_features=2, bias=True)
    """
    out = copy_model(model)
    named = dict(out.named_modules())
    for fqn, changed in architecture.items():
        if fqn not in named:
            raise ConfigError(f"the pruned architecture names {fqn!r}, which the model lacks")
        set_module(out, fqn, _resized(named[fqn], changed))
    return out


def _example(model: nn.Module, data: Dataset | None, spec: PruneSpec) -> torch.Tensor:
    if data is not None:
        return data.example(2)
    shape = spec.options.get("input_shape")
    if shape is None:
        raise ConfigError(
            "structured pruning traces the model on an example input: pass data, or "
            "options={'input_shape': [C, H, W]}"
        )
    return torch.zeros(2, *shape)


def _traces(model: nn.Module, data: Dataset | None, spec: PruneSpec) -> dict[str, float] | None:
    if spec.importance != "hessian":
        return None
    if data is None:
        raise ConfigError("Hessian importance (importance='hessian') needs data")
    return hessian_traces(model, data, spec)


def hessian_traces(model: nn.Module, data: Dataset, spec: PruneSpec) -> dict[str, float]:
    """Per-layer Hessian traces Tr(H_l) (Hutchinson; ``options`` ``hessian_samples``,
    ``hessian_probes``; seeded by ``spec.seed``)."""
    from ..spectrum import analyze_dataset

    samples = int(spec.options.get("hessian_samples", 512))
    probes = int(spec.options.get("hessian_probes", 30))
    spec_ = analyze_dataset(
        model, data, samples=samples, top_k=1, per_layer_eig=False, max_probes=probes,
        min_probes=min(10, probes), seed=spec.seed,
    )  # fmt: skip
    return dict(spec_.layer_trace)


def traced_graph(
    model: nn.Module, example: Any, skip: tuple[str, ...] = ()
) -> tuple[nn.Module, DependencyGraph]:
    """An eval-mode copy of ``model`` and its dependency graph on ``example``, the channels of
    the layers in ``skip`` pinned."""
    work = copy_model(model).eval()
    graph = build(work, example)
    for e, uses in graph.channels().items():
        if any(u.fqn in set(skip) for u in uses):
            graph.pinned.add(e)
    graph._groups = {}
    return work, graph


def prune_structured(model: nn.Module, spec: PruneSpec, data: Dataset | None = None) -> Pruned:
    """Remove whole channels until ``spec.ratio`` of the MACs (or weights) are gone.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> p = prune_structured(net, PruneSpec("structured", 0.5, options={"input_shape": [1, 5, 5]}))
        >>> p.stats["macs_after"] <= 0.5 * p.stats["macs_before"]
        True
    """
    if spec.target == "weights":
        raise ConfigError("structured pruning targets macs or params, not weights")
    example = _example(model, data, spec)
    work, graph = traced_graph(model, example, spec.skip)
    scores = channel_scores(graph, spec.importance, _traces(model, data, spec))
    counter = _Counter(work, graph, example)
    removed = select(graph, counter, scores, spec)
    pruned, arch = shrink(model, graph, removed)
    return finish(model, pruned, arch, spec, counter, graph, removed, example)


def finish(
    model: nn.Module, pruned: nn.Module, arch: dict, spec: PruneSpec, counter: _Counter,
    graph: DependencyGraph, removed: set[int], example: Any,
) -> Pruned:  # fmt: skip
    """The :class:`Pruned` of a structured pruner: per-layer ratios, MACs and parameters before
    and after (the counted MACs checked against the pruned model's), ``pruned`` in ``model``'s
    training mode."""
    pruned.train(model.training)
    ratios = {}
    old_layers = quantizable_layers(model)
    for fqn, m in quantizable_layers(pruned).items():
        ratios[fqn] = 1.0 - m.weight.numel() / old_layers[fqn].weight.numel()
    stats = {
        "macs_before": counter.total(set(), "macs"),
        "macs_after": counter.total(removed, "macs"),
        "params_before": float(sum(p.numel() for p in model.parameters())),
        "params_after": float(sum(p.numel() for p in pruned.parameters())),
        "channels_removed": float(len(removed)),
        "channels_prunable": float(len(graph.channels())),
    }
    if not math.isclose(stats["macs_after"], _measured_macs(pruned, example), rel_tol=1e-6):
        raise AssertionError("internal: counted MACs differ from the pruned model's")
    return Pruned(pruned, spec, ratios, arch, stats)


def _measured_macs(model: nn.Module, example: Any) -> float:
    return float(sum(v.macs for v in profile_layers(model, example[:1]).values()))


def masked(model: nn.Module, graph: DependencyGraph, removed: set[int]) -> nn.Module:
    """The oracle: a same-shaped copy in which the ``removed`` channels reach no consumer (their
    input slices of every consuming conv and Linear are zero). Its outputs equal the pruned
    model's to float round-off."""
    out = copy_model(model)
    named = dict(out.named_modules())
    with torch.no_grad():
        for use, el in graph.uses.items():
            if use.role == "in":
                idx = [i for i, e in enumerate(el) if e in removed]
                named[use.fqn].weight[:, idx] = 0
    return out
