"""Layers that must share one bit width, found in the traced graph.

HAWQ-V3 (arXiv:2011.10680) quantizes the two branches of a residual add to one scale so the integer
add needs no rescaling; the planner therefore ties the widths of the layers whose outputs meet at
one add. :func:`residual_ties` finds them with ``torch.fx``.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .graph import QUANTIZABLE_TYPES, quantizable_layers

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
