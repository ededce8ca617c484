"""What a pruner is asked for (:class:`PruneSpec`) and what it returns (:class:`Pruned`).

A pruner is a function ``handler(model, spec, data) -> Pruned`` registered by name in
:data:`squeezer.prune.PRUNERS`. It never changes ``model``: it prunes a copy and returns it, with
the per-layer ratios and, for structured pruners, the new shapes (``architecture``) from which
:func:`squeezer.prune.structured.rebuild` makes the smaller model again before its weights load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from torch import nn

from ..data import Dataset
from ..errors import ConfigError

#: What ``PruneSpec.ratio`` is a fraction of: the model's MACs per sample, its weight parameters,
#: or (unstructured pruning) the weights of the layers pruned.
TARGETS = ("macs", "params", "weights")


@dataclass(frozen=True)
class PruneSpec:
    """A pruning request: remove ``ratio`` of ``target`` with the method named ``method``.

    Attributes:
        method: a key of :data:`squeezer.prune.PRUNERS` (``"structured"``, ``"unstructured"``,
            ``"nm"``, ``"leap"``, ...).
        ratio: the fraction removed, in [0, 1): ``ratio=0.5, target="macs"`` halves the MACs.
        target: one of :data:`TARGETS`.
        importance: how a channel group or weight is scored: ``"l1"``, ``"l2"`` (magnitude) or
            ``"hessian"`` (½·Tr(H)/n·‖ΔW‖², needs data).
        scope: ``"global"`` (one threshold across layers) or ``"layer"`` (the same ratio in each).
        n, m: the N:M pattern (keep ``n`` of every ``m`` consecutive weights) for ``method="nm"``.
        round_to: structured pruning keeps a multiple of this many channels in each group (8 suits
            ONNX Runtime's blocked convolution kernels, which odd widths fall out of, so that half
            the MACs can run slower than all of them); 1 rounds nothing.
        skip: layer FQNs left whole (the classifier is kept by default by structured pruning).
        seed: every random draw (Hessian probes, LEAP's batches) is seeded from it.
        options: method-specific settings (plain JSON values).

    Example:
        >>> PruneSpec("structured", ratio=0.5).target
        'macs'
    """

    method: str
    ratio: float = 0.5
    target: str = "macs"
    importance: str = "l1"
    scope: str = "global"
    n: int = 2
    m: int = 4
    round_to: int = 8
    skip: tuple[str, ...] = ()
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, int | float) and math.isfinite(self.ratio)):
            raise ConfigError(f"prune ratio must be a number in [0, 1), got {self.ratio!r}")
        if not 0 <= self.ratio < 1:
            raise ConfigError(
                f"prune ratio {self.ratio} is outside [0, 1): it is the fraction removed "
                "(0.5 removes half)"
            )
        if self.target not in TARGETS:
            raise ConfigError(f"prune target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.importance not in ("l1", "l2", "hessian"):
            raise ConfigError(f"prune importance {self.importance!r} is not one of l1, l2, hessian")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"prune scope {self.scope!r} is not one of global, layer")
        if not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise ConfigError(f"round_to must be a positive whole number, got {self.round_to!r}")
        if not (0 < self.n <= self.m):
            raise ConfigError(f"N:M pattern needs 0 < N <= M, got {self.n}:{self.m}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneSpec:
        d = dict(d)
        d["skip"] = tuple(d.get("skip", ()))
        return cls(**d)


@dataclass
class Pruned:
    """A pruner's result.

    Attributes:
        model: the pruned copy (a plain module: smaller layers, or zeros folded into the weights;
            no masks, no hooks).
        spec: the request.
        ratios: per layer FQN, the fraction of its weights removed.
        architecture: per module FQN, the constructor arguments that changed (``{"out_channels":
            12}``); empty for pruners that keep every shape.
        stats: totals before and after (``macs_before``, ``macs_after``, ``params_before``, ...).
    """

    model: nn.Module
    spec: PruneSpec
    ratios: dict[str, float]
    architecture: dict[str, dict[str, int]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the model, as JSON-ready data (``prune.json`` in a run folder)."""
        return {
            "spec": self.spec.to_dict(),
            "ratios": dict(self.ratios),
            "architecture": {k: dict(v) for k, v in self.architecture.items()},
            "stats": dict(self.stats),
        }


class PruneHandler(Protocol):
    """``handler(model, spec, data) -> Pruned``: prune a copy of ``model`` as ``spec`` asks.

    ``data`` is ``None`` when the caller has none: a handler that needs it (Hessian importance,
    LEAP, token pruning) raises :class:`~squeezer.errors.ConfigError` saying so.
    """

    def __call__(self, model: nn.Module, spec: PruneSpec, data: Dataset | None) -> Pruned: ...
