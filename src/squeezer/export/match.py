"""Which node of the exported float graph holds which Quant* layer's weight (step 2 of the rewrite,
see :mod:`.rewrite`): :class:`_WeightIndex`.

Conv/ConvTranspose/Gemm/MatMul/Gather nodes are matched back to layers by the exact values of their
weight initializers, not by names: the TorchScript exporter renames initializers, transposes a
Linear's weight for MatMul and de-duplicates equal tensors, and none of that changes the values. A
digest of the bytes finds the candidates; an exact comparison and the op's kind and layout decide.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .layers import _Layer
from .onnx_graph import _attr, _Graph

#: The layer kind each weight-bearing op computes.
_KIND_OF_OP = {
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Gather": "embedding",
    "Gemm": "linear",
    "MatMul": "linear",
}


def _digest(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a)
    return (a.shape, str(a.dtype), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest())


def _weight_view(layer: _Layer, layout: str) -> np.ndarray:
    """The layer's weight as a node holds it: as it is (``"rows"``) or transposed (``"cols"``)."""
    return layer.weight if layout == "rows" else layer.weight.T


class _WeightIndex:
    """The layers' weights by digest, in each layout a node may hold them."""

    def __init__(self, layers: Mapping[str, _Layer]):
        self.index: dict[tuple, list[tuple[_Layer, str]]] = {}
        self.taken: set[int] = set()
        for layer in layers.values():
            views = {"rows": layer.weight}
            if layer.kind == "linear":
                views["cols"] = np.ascontiguousarray(layer.weight.T)
            for layout, arr in views.items():
                self.index.setdefault(_digest(arr), []).append((layer, layout))

    def match(self, node, graph: _Graph, producers: Mapping[str, Any]) -> tuple[_Layer, str] | None:
        """(the layer whose weight ``node`` reads, its layout there), or None."""
        op = node.op_type
        if op in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            idx = 1
        elif op == "Gather" and _attr(node, "axis", 0) == 0:
            idx = 0
        else:
            return None
        if len(node.input) <= idx:
            return None
        init = graph.resolve(node.input[idx], producers)
        if init is None:
            return None
        arr = graph.array(init)
        want = {"Conv": "rows", "ConvTranspose": "rows", "Gather": "rows", "MatMul": "cols"}.get(op)
        if op == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
                return None
            want = "rows" if _attr(node, "transB", 0) else "cols"
        hits = [
            (layer, layout)
            for layer, layout in self.index.get(_digest(arr), [])
            if _KIND_OF_OP[op] == layer.kind
            and layout == want
            and np.array_equal(arr, _weight_view(layer, layout))
        ]
        # Equal weights in two layers (the clones of nn.TransformerEncoder before training, say)
        # are one initializer read by two nodes: in graph order, each node takes the first such
        # layer no node has taken yet, so each keeps its own activation quantizer. A layer run
        # several times (ALBERT's shared blocks) is every one of its nodes' layer.
        for layer, layout in hits:
            if id(layer) not in self.taken:
                self.taken.add(id(layer))
                return layer, layout
        return hits[0] if hits else None
