"""Pruning: one verb, :func:`prune`, and a registry of pruners, :data:`PRUNERS`.

A pruner is ``handler(model, spec, data) -> Pruned`` (:class:`~squeezer.prune.base.PruneHandler`):
it prunes a copy of ``model`` as the :class:`PruneSpec` asks (``data`` may be ``None``; a handler
that needs data says so with a ``ConfigError``) and returns a :class:`Pruned` with the new model,
its per-layer ratios and, for structured pruners, the changed shapes. A new method adds one entry
to :data:`PRUNERS` (``"name": module.handler``) and nothing else.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> p = prune(net, PruneSpec("unstructured", ratio=0.25, target="weights"))
    >>> sorted(p.ratios)
    ['0', '2']
"""

from __future__ import annotations

from torch import nn

from ..data import Dataset
from ..errors import ConfigError
from .base import TARGETS, Pruned, PruneHandler, PruneSpec
from .heads import prune_heads
from .leap import prune_leap
from .structured import prune_structured
from .tokens import prune_tokens
from .unstructured import prune_nm, prune_unstructured

#: Pruners by name (the ``--prune`` choices).
PRUNERS: dict[str, PruneHandler] = {
    "structured": prune_structured,
    "unstructured": prune_unstructured,
    "nm": prune_nm,
    "leap": prune_leap,
    "heads": prune_heads,
    "tokens": prune_tokens,
}


def prune(model: nn.Module, spec: PruneSpec, data: Dataset | None = None) -> Pruned:
    """Prune a copy of ``model`` with the pruner ``spec.method``; ``model`` is left untouched."""
    try:
        handler = PRUNERS[spec.method]
    except KeyError:
        raise ConfigError(
            f"unknown pruning method {spec.method!r}; choose one of {', '.join(PRUNERS)}"
        ) from None
    return handler(model, spec, data)


__all__ = ["PRUNERS", "TARGETS", "PruneHandler", "PruneSpec", "Pruned", "prune"]
