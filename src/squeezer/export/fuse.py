"""The last pass of the rewrite (step 6, see :mod:`.rewrite`): :func:`_fuse_integer_matmuls` writes
a MatMul that reads an 8-bit quantized input and 8-bit weight codes, with the bias Add after it, as
one ``MatMulIntegerToFloat`` (com.microsoft).

ONNX Runtime fuses the QDQ form into the same kernel but leaves the bias as a separate Add, which
then fuses with a following GELU into a slower BiasGelu; on MiniLM at batch 32 those Adds and
BiasGelus cost more than the integer matmuls gain (docs/benchmarks.md, Deployment). The computation
is the one the QDQ graph describes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import MS_DOMAIN
from .onnx_graph import _attr, _Graph, _producers_consumers


def _fuse_integer_matmuls(graph: _Graph, nodes: list) -> list:
    """``nodes`` with each MatMul that reads an 8-bit quantized activation and 8-bit weight codes
    (per tensor or per output column), together with the bias Add that follows it, replaced by
    one ``MatMulIntegerToFloat`` taking the integer tensors and the bias."""
    from onnx import helper

    producers, consumers = _producers_consumers(nodes)
    outputs = graph.outputs
    replaced: dict[int, Any] = {}
    dropped: set[int] = set()
    for n in nodes:
        if n.op_type != "MatMul":
            continue
        a_dq, b_dq = producers.get(n.input[0]), producers.get(n.input[1])
        if not _reads_integer_tensors(graph, a_dq, b_dq, producers):
            continue
        codes, w_scale = graph.array(b_dq.input[0]), graph.array(b_dq.input[1])
        if codes.dtype not in (np.int8, np.uint8) or codes.ndim != 2:
            continue
        if w_scale.ndim == 1 and (
            _attr(b_dq, "axis", 1) not in (1, -1) or w_scale.size != codes.shape[1]
        ):
            continue
        out, bias = n.output[0], ""
        readers = consumers.get(out, [])
        if out not in outputs and len(readers) == 1 and readers[0].op_type == "Add":
            add = readers[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = graph.array(other)
            if b is not None and b.dtype == np.float32 and b.shape == (codes.shape[1],):
                out, bias = add.output[0], other
                dropped.add(id(add))
        w_zero = b_dq.input[2] if len(b_dq.input) > 2 else ""
        ins = [a_dq.input[0], b_dq.input[0], a_dq.input[1], b_dq.input[1], a_dq.input[2]]
        ins += [w_zero, bias]
        while not ins[-1]:
            ins.pop()
        replaced[id(n)] = helper.make_node(
            "MatMulIntegerToFloat", ins, [out], domain=MS_DOMAIN, name=n.name
        )
        graph.uses_ms = True
    if not replaced:
        return nodes
    kept = [replaced.get(id(n), n) for n in nodes if id(n) not in dropped]
    return graph.toposort(kept)


def _reads_integer_tensors(graph: _Graph, a_dq, b_dq, producers) -> bool:
    """True if a MatMul's inputs are DequantizeLinear of a quantized activation (per-tensor,
    zero point given) and of weight codes held in initializers."""
    return (
        a_dq is not None
        and b_dq is not None
        and a_dq.op_type == b_dq.op_type == "DequantizeLinear"
        and len(a_dq.input) == 3
        and all(x in graph.inits for x in a_dq.input[1:])
        and graph.array(a_dq.input[1]).ndim == 0
        and producers.get(a_dq.input[0]) is not None
        and producers[a_dq.input[0]].op_type == "QuantizeLinear"
        and b_dq.input[0] in graph.inits
        and all(x in graph.inits for x in b_dq.input[1:] if x)
    )
