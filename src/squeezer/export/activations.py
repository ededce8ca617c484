"""The activation pass of the rewrite (steps 4 and 5, see :mod:`.rewrite`):
:func:`_place_act_quantizers` puts squeezer's activation quantizers into the graph as
QuantizeLinear/DequantizeLinear pairs (:class:`_ActQuantizers`).

Quantization commutes with ReLU, MaxPool and reshapes (it is monotone and maps 0 to 0), so a tensor
all of whose readers quantize it with the same parameters is quantized where it is produced as well.
That places a QuantizeLinear right after the producing Conv/Gemm, which ONNX Runtime needs to fuse
an integer op, without changing a single value.

In requantize mode the tensors squeezer keeps in float between int8-capable ops (residual sums,
pooled maps: :func:`_int8_inputs`) take 8-bit quantizers with ranges observed on the example, so
that every Conv and residual Add runs in int8, as ONNX Runtime's own static quantization does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .codes import _code_dtype, _full_range_8bit
from .common import commutes
from .layers import _Act
from .onnx_graph import _Graph

#: What a tensor should be quantized with where it is produced, and why: (quantizer or None,
#: "layer" (a layer reads it), "calib" (int8-capable ops read it, requantize mode) or "none").
_Wanted = tuple[_Act | None, str]


class _ActQuantizers:
    """Q/DQ nodes of activation quantizers; each quantizer's scale and zero point are
    initializers made once per export (both runs of the activation pass share them)."""

    def __init__(self, graph: _Graph):
        self.graph = graph
        self._inits: dict[_Act, tuple[str, str]] = {}

    def quantize(self, t: str, act: _Act) -> tuple[str, list]:
        """Q/DQ (or exact float fake-quant for > 8 bits) of tensor ``t``; returns the new name."""
        graph = self.graph
        dtype = _code_dtype(act.qmin, act.qmax)
        if act not in self._inits:
            i = len(self._inits)
            zdt = dtype if dtype is not None else np.float32
            self._inits[act] = (
                graph.add_init(f"act{i}_s", np.float32(act.scale)),
                graph.add_init(f"act{i}_z", np.asarray(act.zero_point, zdt)),
            )
        s, z = self._inits[act]
        src, nodes = t, []
        out = graph.fresh(f"{t}_fq")
        if dtype is None:  # > 8-bit codes: the fake-quant formula in float ops, exactly
            lo = graph.add_init("qmin", np.float32(act.qmin))
            hi = graph.add_init("qmax", np.float32(act.qmax))
            a, b, c, d, e = (graph.fresh(f"{t}_fq{k}") for k in range(5))
            nodes += [
                graph.node("Div", [src, s], [a]),
                graph.node("Round", [a], [b]),
                graph.node("Add", [b, z], [c]),
                graph.node("Clip", [c, lo, hi], [d]),
                graph.node("Sub", [d, z], [e]),
                graph.node("Mul", [e, s], [out]),
            ]
            return out, nodes
        info = np.iinfo(dtype)
        if (act.qmin, act.qmax) != (info.min, info.max):  # a narrower range: clip before Q
            lo = graph.add_init("clip_lo", np.float32((act.qmin - act.zero_point) * act.scale))
            hi = graph.add_init("clip_hi", np.float32((act.qmax - act.zero_point) * act.scale))
            clipped = graph.fresh(f"{t}_clipped")
            nodes.append(graph.node("Clip", [src, lo, hi], [clipped]))
            src = clipped
        q = graph.fresh(f"{t}_quantized")
        nodes += [
            graph.node("QuantizeLinear", [src, s, z], [q]),
            graph.node("DequantizeLinear", [q, s, z], [out]),
        ]
        return out, nodes


def _place_act_quantizers(
    graph: _Graph,
    nodes: list,
    act_of: Mapping[int, _Act],
    quantizers: _ActQuantizers,
    calib: Mapping[str, _Act] | None = None,
) -> list:
    """Copies of ``nodes`` with the activation quantizers put in (``act_of``: {id(node): the
    quantizer of its input 0}).

    A tensor is quantized where it is produced when every use of it (through commuting ops)
    applies the same squeezer quantizer. With ``calib`` (requantize mode) a tensor also takes
    the quantizer of a layer that reads it when its other readers are int8-capable ops, and a
    tensor read only by int8-capable ops (residual Add, pooling, Concat) takes its calibrated
    8-bit quantizer from ``calib``.
    """
    from onnx import NodeProto

    copied: dict[int, _Act] = {}
    copies = []
    for n in nodes:
        c = NodeProto()
        c.CopyFrom(n)
        copies.append(c)
        if id(n) in act_of:
            copied[id(c)] = act_of[id(n)]
    act_of, nodes = copied, copies
    outputs = graph.outputs
    calib = None if calib is None else dict(calib)  # grows below; the planners read it as it grows

    consumers, wanted = _planner(nodes, act_of, outputs, graph.inits, calib)
    # A ReLU between two copies of one quantizer whose zero point is its lowest code sees only
    # values ≥ 0: it is the identity, so drop it (ONNX Runtime would leave a requantize pair).
    drop = set()
    for n in nodes:
        if n.op_type == "Relu":
            act, _ = wanted(n.input[0])
            if act is not None and act.zero_point == act.qmin and wanted(n.output[0])[0] == act:
                drop.add(id(n))
                for c, i in consumers.get(n.output[0], []):
                    c.input[i] = n.input[0]
                if calib is not None and n.output[0] in calib:
                    calib[n.input[0]] = calib[n.output[0]]
    if drop:
        nodes = [n for n in nodes if id(n) not in drop]
        consumers, wanted = _planner(nodes, act_of, outputs, graph.inits, calib)

    tensors = [i.name for i in graph.g.input if i.name not in graph.inits]
    tensors += [o for n in nodes for o in n.output if o]
    extra = []
    fq: set[str] = set()
    for t in tensors:
        act, _ = wanted(t)
        if act is None:
            continue
        qt, made = quantizers.quantize(t, act)
        extra += made
        fq.add(qt)
        for c, i in consumers.get(t, []):
            c.input[i] = qt
    private: dict[tuple[str, _Act], str] = {}
    for n in nodes:  # a layer whose input is also used unquantized gets its own pair
        act = act_of.get(id(n))
        if act is None or n.input[0] in fq:
            continue
        key = (n.input[0], act)
        if key not in private:
            private[key], made = quantizers.quantize(n.input[0], act)
            extra += made
        n.input[0] = private[key]
    return graph.toposort(nodes + extra)


def _planner(
    nodes: list,
    act_of: Mapping[int, _Act],
    outputs: set[str],
    inits: Mapping[str, Any],
    calib: Mapping[str, _Act] | None,
) -> tuple[dict[str, list[tuple[Any, int]]], Callable[[str], _Wanted]]:
    """({tensor: [(reader, input index)]}, ``wanted``: tensor → the quantizer to apply where it
    is produced (memoized over ``nodes``)."""
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for n in nodes:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))
    capable = _int8_nodes(nodes, inits, act_of, outputs) if calib is not None else set()
    constants = _constants(nodes, inits)
    memo: dict[str, _Wanted] = {}

    def wanted(t: str) -> _Wanted:
        """(the quantizer to apply where ``t`` is produced or None, "layer" or "calib")."""
        if t in memo:
            return memo[t]
        memo[t] = (None, "none")  # guards cycles (there are none in a valid graph)
        hard, soft, other = set(), set(), False
        if t in outputs or t not in consumers:
            memo[t] = (None, "none")
            return memo[t]
        for c, i in consumers[t]:
            if i == 0 and id(c) in act_of:
                hard.add(act_of[id(c)])
            elif i == 0 and commutes(c, constants) and len([o for o in c.output if o]) == 1:
                act, kind = wanted(c.output[0])
                if kind == "layer":
                    hard.add(act)
                elif kind == "calib":
                    soft.add(act)
                else:
                    other = True
            elif calib is not None and t in calib and c.output[0] in capable:
                soft.add(calib[t])
            else:
                other = True
        narrow = len(hard) == 1 and not _full_range_8bit(next(iter(hard)))
        if other or len(hard) > 1 or (narrow and soft):
            # A layer's narrower grid (4-bit, clipped) must not reach an int8-capable reader: a
            # residual sum read by a 4-bit conv and by the next residual Add would carry the
            # 4-bit rounding down the whole chain of shortcuts (0.8 at the output of a deep
            # digits ResNet, 2x the quantization's own effect). Such a tensor stays float.
            memo[t] = (None, "none")
        elif hard:  # readers that are not layers are int8-capable ops (requantize mode)
            memo[t] = (hard.pop(), "layer")
        elif len(soft) == 1:
            memo[t] = (soft.pop(), "calib")
        else:
            memo[t] = (None, "none")
        return memo[t]

    return consumers, wanted


def _constants(nodes: list, inits: Mapping[str, Any]) -> dict[str, Any]:
    """Initializers and the outputs of Constant nodes, by name (TensorProtos)."""
    out = dict(inits)
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _int8_inputs(graph: _Graph, nodes: list, act_of: Mapping[int, _Act]) -> list[str]:
    """Tensors read by int8-capable ops (requantize mode calibrates their ranges)."""
    outputs = graph.outputs
    capable = _int8_nodes(nodes, graph.inits, act_of, outputs)
    names = []
    for n in nodes:
        if n.output[0] in capable:
            for x in n.input:
                if x and x not in graph.inits and x not in outputs and x not in names:
                    names.append(x)
    return names


def _int8_nodes(
    nodes: list, inits: Mapping[str, Any], act_of: Mapping[int, _Act], outputs: set[str]
) -> set[str]:
    """The first outputs of the ops ONNX Runtime runs on int8 tensors in a QDQ graph and whose
    int8 result is used: pooling, a residual Add (of two computed tensors) or a Concat, when every
    reader of its result, through commuting ops, is a layer quantizing its input to a full 8-bit
    grid or another such op. An Add that feeds a LayerNorm or a softmax (a transformer's residual
    sums, embedding sums, attention masks) runs in float whatever its input codes, so requantizing
    it would add a rounding and gain nothing (it put BERT-family exports 1-3 output steps from
    squeezer). A layer with a narrower grid (4-bit activations) runs as a float Conv in ONNX
    Runtime, and an 8-bit rounding before its 4-bit one flips 4-bit codes (it put a deep digits
    ResNet at 4-bit activations 2x its quantization error away from squeezer): not int8 use."""
    readers: dict[str, list[tuple[Any, int]]] = {}
    for n in nodes:
        for i, x in enumerate(n.input):
            readers.setdefault(x, []).append((n, i))
    constants = _constants(nodes, inits)
    pools = {n.output[0] for n in nodes if n.op_type in ("GlobalAveragePool", "AveragePool")}
    maybe = {
        n.output[0]: n
        for n in nodes
        if n.op_type == "Concat"
        or (n.op_type == "Add" and all(x and x not in inits for x in n.input))
    }

    def used_in_int8(t: str, capable: set[str], seen: set[str]) -> bool:
        if t in outputs or t not in readers or t in seen:
            return t in seen
        seen.add(t)
        for c, i in readers[t]:
            if i == 0 and id(c) in act_of:
                if _full_range_8bit(act_of[id(c)]):
                    continue
                return False
            if c.output[0] in capable:
                continue
            outs = [o for o in c.output if o]
            if commutes(c, constants) and i == 0 and len(outs) == 1:
                if used_in_int8(outs[0], capable, seen):
                    continue
            return False
        return True

    capable = pools | set(maybe)
    changed = True
    while changed:  # the largest set consistent with the rule (chains of residual Adds stay)
        changed = False
        for t in sorted(capable):
            if t in capable and not used_in_int8(t, capable, set()):
                capable.discard(t)
                changed = True
    return capable
