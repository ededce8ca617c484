"""Which channels must be removed together: a dependency graph over the traced model.

Every tensor of the traced model (``torch.fx`` plus shape propagation on an example) carries a
list of *channel elements*, one per channel (dimension 1; after a flatten, one per feature, so a
channel spread over ``S`` positions appears ``S`` times). A conv or Linear creates fresh elements
for its outputs; BatchNorm, activations, pooling, dropout, padding of the positions and depthwise
convs pass their input's elements through; an element-wise add or multiply of two same-shaped
tensors *unites* their elements (a residual add couples both branches' channels); ``torch.cat`` on dimension 1
concatenates the lists. Each united set of elements is one prunable channel: removing it drops one
filter from every layer that produces it, one input slice from every layer that consumes it, one
entry from every BatchNorm between. This is the idea of DepGraph (Fang et al., arXiv:2301.12900),
built here on element-level union-find.

Anything the graph does not understand — an op outside the known list, a view that is not a
flatten, a grouped (non-depthwise) conv, a parameter read inside ``forward`` — *pins* the channels
it touches: they are never pruned, so an unknown op can make pruning timid but never wrong. The
model's inputs and outputs are pinned too (the classifier keeps its classes).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Modules that keep each channel where it is (element-wise or per-channel over space).
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
)  # fmt: skip
_PASS_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.sigmoid, torch.tanh,
    torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.hardswish,
    torch.nn.functional.leaky_relu, torch.nn.functional.dropout, torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool2d, torch.clamp, operator.neg,
}  # fmt: skip
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "contiguous", "clone", "detach"}
_BINARY = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub, "add", "mul",
           "sub", "add_", "mul_"}  # fmt: skip
_CATS = {torch.cat, torch.concat}
_FLATTENS = {torch.flatten, "flatten"}
_VIEWS = {"view", "reshape", torch.reshape}
#: Reductions over the positions (dims ≥ 2), which keep dimension 1.
_MEANS = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}


@dataclass(frozen=True)
class Use:
    """One place a channel element appears: module ``fqn`` in ``role`` at these indices.

    Roles: ``"out"`` (a conv's filter / a Linear's output row), ``"in"`` (a conv's input channel /
    a Linear's input column), ``"norm"`` (a BatchNorm entry), ``"depthwise"`` (a depthwise conv's
    channel: its filter, input and group at once).
    """

    fqn: str
    role: str


@dataclass
class DependencyGraph:
    """The coupled channels of a model.

    Attributes:
        uses: per ``(fqn, role)``, the element (after union) at each index of that axis.
        pinned: elements never pruned.
        modules: the traced modules by FQN (the model's own objects).
    """

    uses: dict[Use, list[int]]
    pinned: set[int]
    modules: dict[str, nn.Module]
    _groups: dict[int, dict[Use, list[int]]] = field(default_factory=dict, repr=False)

    def channels(self) -> dict[int, dict[Use, list[int]]]:
        """Every prunable channel (an element id) with, per use, the indices it occupies."""
        if not self._groups:
            groups: dict[int, dict[Use, list[int]]] = defaultdict(lambda: defaultdict(list))
            for use, elems in self.uses.items():
                for i, e in enumerate(elems):
                    groups[e][use].append(i)
            self._groups = {
                e: dict(g)
                for e, g in groups.items()
                if e not in self.pinned and any(u.role in ("out", "depthwise") for u in g)
            }
        return self._groups

    def keep(self, removed: set[int]) -> dict[Use, list[int]]:
        """Per use, the indices that stay when the elements ``removed`` go."""
        return {u: [i for i, e in enumerate(el) if e not in removed] for u, el in self.uses.items()}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def trace(model: nn.Module, example: Any) -> torch.fx.GraphModule:
    """``model`` traced by ``torch.fx`` with every node's output shape (``node.meta``) filled in
    from ``example``; an :class:`UnsupportedModelError` if it cannot be traced."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}); structured pruning needs "
            "a forward without data-dependent control flow"
        ) from exc
    was = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*(example if isinstance(example, tuple) else (example,)))
    gm.train(was)
    return gm


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def build(model: nn.Module, example: Any) -> DependencyGraph:
    """The dependency graph of ``model`` on inputs like ``example`` (a batch).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> g = build(net, torch.zeros(2, 1, 5, 5))
        >>> len(g.channels())  # conv 0's four filters (the last conv's outputs are the model's)
        4
    """
    gm = trace(model, example)
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    chans: dict[torch.fx.Node, list[int]] = {}
    raw_uses: dict[Use, list[int]] = {}
    pinned: list[int] = []

    def fresh(node: torch.fx.Node, pin: bool = False) -> list[int]:
        shape = _shape(node)
        n = shape[1] if shape is not None and len(shape) >= 2 else 0
        elems = uf.new(n)
        if pin:
            pinned.extend(elems)
        return elems

    def use(fqn: str, role: str, elems: list[int]) -> None:
        key = Use(fqn, role)
        if key in raw_uses:  # a module called twice: its indices are one axis, so unite them
            for a, b in zip(raw_uses[key], elems, strict=True):
                uf.union(a, b)
        else:
            raw_uses[key] = list(elems)

    def pin_inputs(node: torch.fx.Node) -> None:
        for a in node.all_input_nodes:
            pinned.extend(chans.get(a, []))

    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        first = chans.get(args[0]) if args else None
        if node.op == "placeholder":
            chans[node] = fresh(node, pin=True)
        elif node.op == "output":
            pin_inputs(node)
        elif node.op == "call_module":
            chans[node] = _module_step(modules[node.target], node, first, fresh, use, pin_inputs)
        elif node.op in ("call_function", "call_method"):
            chans[node] = _function_step(node, chans, uf, fresh, pin_inputs)
        else:  # get_attr: a tensor read inside forward, its channels are unknown to us
            chans[node] = fresh(node, pin=True)

    roots = {e for e in (uf.find(p) for p in pinned)}
    uses = {u: [uf.find(e) for e in el] for u, el in raw_uses.items()}
    named = {k: m for k, m in model.named_modules() if k}
    return DependencyGraph(uses, roots, {u.fqn: named[u.fqn] for u in uses})


def _module_step(mod, node, first, fresh, use, pin_inputs) -> list[int]:
    shape_in = _shape(node.args[0]) if node.args else None
    if first is None or shape_in is None:
        pin_inputs(node)
        return fresh(node, pin=True)
    if isinstance(mod, _CONVS) and type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if mod.groups == 1:
            use(node.target, "in", first)
            out = fresh(node)
            use(node.target, "out", out)
            return out
        if mod.groups == mod.in_channels == mod.out_channels:
            use(node.target, "depthwise", first)
            return list(first)
        pin_inputs(node)  # grouped conv: channels tied within groups (left whole)
        return fresh(node, pin=True)
    if type(mod) is nn.Linear and len(shape_in) == 2:
        use(node.target, "in", first)
        out = fresh(node)
        use(node.target, "out", out)
        return out
    if isinstance(mod, _NORMS) and type(mod) in _NORMS:
        use(node.target, "norm", first)
        return list(first)
    if isinstance(mod, _PASS_MODULES) and not (
        isinstance(mod, nn.PReLU) and mod.num_parameters > 1
    ):
        return list(first)
    if isinstance(mod, nn.Flatten) and mod.start_dim == 1:
        return _flatten(first, shape_in, _shape(node))
    pin_inputs(node)
    return fresh(node, pin=True)


def _flatten(first: list[int], shape_in, shape_out) -> list[int] | None:
    if shape_out is None or len(shape_out) != 2 or shape_out[0] != shape_in[0]:
        return None
    spread = shape_out[1] // max(len(first), 1)
    if spread * len(first) != shape_out[1]:
        return None
    return [e for e in first for _ in range(spread)]


def _function_step(node, chans, uf, fresh, pin_inputs) -> list[int]:
    target = node.target
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    first = chans.get(tensors[0]) if tensors else None
    out_shape = _shape(node)
    in_shape = _shape(tensors[0]) if tensors else None
    out: list[int] | None = None
    if first is None or in_shape is None or out_shape is None:
        out = None
    elif target in _PASS_FUNCTIONS or target in _PASS_METHODS:
        out = list(first) if out_shape[:2] == in_shape[:2] else None
    elif target is torch.nn.functional.pad:
        out = list(first) if _spatial_pad(node, in_shape, out_shape) else None
    elif target in _BINARY:
        out = _binary(node, chans, uf, out_shape)
    elif target in _CATS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        parts = node.args[0]
        if dim in (1, -len(out_shape)) and all(p in chans for p in parts):
            out = [e for p in parts for e in chans[p]]
    elif target in _FLATTENS:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        if start == 1 or (target == "flatten" and start == 1):
            out = _flatten(first, in_shape, out_shape)
    elif target in _VIEWS:
        out = _flatten(first, in_shape, out_shape) if len(out_shape) == 2 else None
        if out_shape == in_shape:
            out = list(first)
    elif target in _MEANS:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if dims and all(d >= 2 or d < -1 and d >= -(len(in_shape) - 2) for d in dims):
            out = list(first) if out_shape[:2] == in_shape[:2] else None
    if out is None or len(out) != (out_shape[1] if out_shape and len(out_shape) >= 2 else -1):
        pin_inputs(node)
        return fresh(node, pin=True)
    return out


def _spatial_pad(node, in_shape, out_shape) -> bool:
    """True if an ``F.pad`` pads only the positions (dims ≥ 2), so each channel stays where it is
    (e.g. TensorFlow-"SAME" padding before a stride-2 conv)."""
    pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(pad, (tuple, list)) or not all(isinstance(v, int) for v in pad):
        return False
    return len(pad) <= 2 * (len(in_shape) - 2) and out_shape[:2] == in_shape[:2]


def _binary(node, chans, uf, out_shape) -> list[int] | None:
    """An element-wise op: same-shaped channel axes unite; a per-sample scalar or a constant
    broadcast over channels passes the channels through."""
    tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    full = [a for a in tensors if (_shape(a) or ())[1:2] == out_shape[1:2] and a in chans]
    if any(a not in chans for a in tensors) or not full:
        return None
    for a in tensors:
        s = _shape(a) or ()
        if a not in full and len(s) >= 2 and s[1] != 1:
            return None
    base = chans[full[0]]
    for other in full[1:]:
        for x, y in zip(base, chans[other], strict=True):
            uf.union(x, y)
    return list(base)
