"""The weight pass of the rewrite (step 3, see :mod:`.rewrite`): :func:`_rewrite_weights` turns each
node holding a Quant* layer's weight into integer codes and the nodes that dequantize them.

* Per tensor or per output channel (axis 0 of the layer's weight, axis 1 of a ConvTranspose's) the
  codes feed a DequantizeLinear; group-wise codes are dequantized by Cast/Sub/Mul on initializers
  (blocked DequantizeLinear needs opset 21, which the TorchScript exporter cannot write), which
  ONNX Runtime folds at load. Weight-only Linears go to MatMulNBits instead (:mod:`.nbits`), and an
  embedding looks up its int8 codes and dequantizes only the rows it reads.
* A Conv followed by BatchNorm is folded: the codes stay, the per-channel scale absorbs |γ/σ| (codes
  mirrored where γ/σ < 0) and the bias absorbs the shift.
* Biases of layers whose inputs are 8-bit quantized are int32 at scale s_x·s_w, as QLinearConv and
  QGemm take them; with narrower activations the bias is a separate float Add (ONNX Runtime would
  otherwise round it to int32 itself, which at 4 bits moves outputs visibly). ONNX Runtime's CPU
  provider has no integer ConvTranspose (it leaves QDQ → ConvTranspose unfused and its float bias
  alone), so a ConvTranspose keeps DequantizeLinear on its weight codes, a float kernel and its
  float bias.
* Initializers are named after the layer with short suffixes: ``conv1.w_q`` (codes), ``.w_s``
  (scale), ``.w_z`` (zero point), ``.b_q`` (int32 bias), ``.b_sx`` (its input's scale). On a small
  net long names were a few percent of the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .codes import _code_dtype, _full_range_8bit, _layout, _WeightCodes
from .layers import _Act, _Layer
from .match import _WeightIndex
from .nbits import _matmul_nbits
from .onnx_graph import _attr, _Graph, _producers_consumers, _single_consumer


def _rewrite_weights(
    graph: _Graph,
    layers: Mapping[str, _Layer],
    *,
    accuracy_level: int | None,
    weight_codes: str = "int8",
) -> tuple[list, dict[int, _Act]]:
    """(the graph's nodes with every matched weight in integer form, {id(node): the activation
    quantizer of its input 0} for the layers that quantize their input). ``weight_codes``
    ``"uint8"`` stores the 8-bit codes of layers with uint8 inputs shifted by 128 (see
    :func:`_unsigned`)."""
    index = _WeightIndex(layers)
    nodes = list(graph.g.node)
    producers, consumers = _producers_consumers(nodes)
    outputs = graph.outputs
    act_of: dict[int, _Act] = {}
    dropped: set[int] = set()
    new_nodes = []
    for n in nodes:
        if id(n) in dropped:
            continue
        hit = index.match(n, graph, producers)
        if hit is None:
            new_nodes.append(n)
            continue
        layer, layout = hit
        w = _WeightCodes.of(layer)
        # the bias as an array; None when there is none or it is computed (then left alone)
        has_bias = len(n.input) > 2 and bool(n.input[2])
        bias = graph.array(graph.resolve(n.input[2], producers) or "") if has_bias else None
        if n.op_type == "Conv" and (bias is not None or not has_bias):
            bn = _single_consumer(n.output[0], consumers, outputs)
            if bn is not None and bn.op_type == "BatchNormalization":
                folded = _fold_batchnorm(graph, w, bias, bn, producers)
                if folded is not None:
                    w, bias = folded
                    dropped.add(id(bn))
                    n.output[0] = bn.output[0]
        if weight_codes == "uint8":
            w = _unsigned(w, layer)
        new_nodes.extend(_rewrite_node(graph, n, layer, layout, w, bias, act_of, accuracy_level))
    return new_nodes, act_of


def _unsigned(w: _WeightCodes, layer: _Layer) -> _WeightCodes:
    """``w`` as uint8 codes with zero point 128 (same values) when the layer runs as uint8 × int8
    and its codes are wider than 7 bits; else ``w``. On x86 without VNNI ONNX Runtime adds
    pairs of uint8 × int8 products in int16, which saturates above ±32,767: 2 · 255 · 64 does not,
    2 · 255 · 127 does. Its uint8 × uint8 kernel widens to int16 first and is exact."""
    act = layer.act
    if act is None or _code_dtype(act.qmin, act.qmax) != np.uint8:
        return w
    if _code_dtype(w.qmin, w.qmax) != np.int8 or max(-w.qmin, w.qmax) <= 64:
        return w
    if w.scale.shape[1] != 1:  # group-wise codes are dequantized in float ops: no integer kernel
        return w
    codes, zero = (a.astype(np.int32) + 128 for a in (w.codes, w.zero_point))
    return _WeightCodes(codes, w.scale, zero, w.qmin + 128, w.qmax + 128, w.per_tensor)


def _fold_batchnorm(
    graph: _Graph, w: _WeightCodes, bias: np.ndarray | None, bn, producers: Mapping[str, Any]
) -> tuple[_WeightCodes, np.ndarray] | None:
    """(codes, bias) of the Conv with BatchNorm ``bn`` folded in, or None if it cannot be."""
    if len([o for o in bn.output if o]) != 1 or _attr(bn, "training_mode", 0):
        return None
    params = [graph.array(graph.resolve(x, producers) or "") for x in bn.input[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = _attr(bn, "epsilon", 1e-5)
    f = gamma / np.sqrt(var + eps)
    if not np.all(np.isfinite(f)) or np.any(f == 0):
        return None
    b = np.zeros_like(f) if bias is None else bias.astype(np.float64)
    new_bias = ((b - mean) * f + beta).astype(np.float32)
    return w.scaled(f), new_bias


def _rewrite_node(
    graph: _Graph,
    n,
    layer: _Layer,
    layout: str,
    w: _WeightCodes,
    bias: np.ndarray | None,
    act_of: dict[int, _Act],
    accuracy_level: int | None,
) -> list:
    """The nodes replacing ``n``: weight DequantizeLinear (or MatMulNBits), quantized bias. A node
    whose layer quantizes its input is recorded in ``act_of``."""
    out = []
    if n.op_type == "Gather":
        return _gather(graph, n, layer, w)
    if (
        layer.kind == "linear"
        and (layer.act is None or _code_dtype(layer.act.qmin, layer.act.qmax) is None)
        and layer.qmax - layer.qmin <= 255
        and (n.op_type == "MatMul" or (n.op_type == "Gemm" and layout == "rows"))
        and _attr(n, "beta", 1.0) == 1.0
    ):
        nb = _matmul_nbits(graph, n, layer, w, bias, accuracy_level)
        if nb is not None:
            return nb
    dtype = _code_dtype(w.qmin, w.qmax)
    base = f"{layer.fqn}.w"
    wscale = ""
    if dtype is None:  # codes wider than 8 bits: keep the dequantized weight in float
        arr = layer.native(w.dequantized())
        arr = arr if layout == "rows" else arr.T
        n.input[1] = graph.add_init(base, arr.astype(np.float32))
        layer.status = f"float ({layer.spec.bits}-bit codes do not fit int8)"
    else:
        n.input[1], extra = _weight_dq(graph, layer, layout, w, dtype, base)
        out.extend(extra)
        if extra[0].op_type == "DequantizeLinear":
            wscale = extra[0].input[1]
        layer.status = "qdq-int8" if layer.act is not None else "qdq-int8 weight-only"
        if layer.kind == "conv_transpose" and layer.act is not None:
            layer.status = "qdq-int8 float-kernel"  # ONNX Runtime has no integer kernel
    after = []
    # A ConvTranspose keeps its float bias: no integer kernel would use an int32 one.
    if bias is not None and n.op_type != "ConvTranspose":
        n_in = list(n.input)
        while len(n_in) < 3:
            n_in.append("")
        narrow = layer.act is not None and not _full_range_8bit(layer.act)
        if narrow and _attr(n, "beta", 1.0) == 1.0:
            # ONNX Runtime rounds a float bias of DQ → Conv/Gemm to int32 at s_x·s_w (its
            # WeightBiasQuantization pass), up to 0.5 s_x·s_w off: large at 4 bits. A separate
            # Add keeps it exact; these layers do not fuse into integer kernels anyway.
            shape = (-1,) + (1,) * (len(layer.shape) - 2) if n.op_type == "Conv" else (-1,)
            b = graph.add_init(f"{layer.fqn}.bias", bias.astype(np.float32).reshape(shape))
            y, n_in[2] = n.output[0], ""
            n.output[0] = graph.fresh(f"{y}_without_bias")
            after.append(graph.node("Add", [n.output[0], b], [y]))
        else:
            n_in[2], extra = _bias_input(graph, layer, w, bias, wscale)
            out.extend(extra)
        while n_in and not n_in[-1]:
            n_in.pop()
        del n.input[:]
        n.input.extend(n_in)
    if layer.act is not None:
        act_of[id(n)] = layer.act
    return [*out, n, *after]


def _weight_dq(graph: _Graph, layer: _Layer, layout: str, w: _WeightCodes, dtype, base: str):
    """(name of the dequantized weight, nodes making it)."""
    codes = w.codes.astype(dtype)
    deq = graph.fresh(f"{base}_dequantized")
    # int8 codes are symmetric here (zero point 0, the default): no zero-point initializer
    zero = dtype == np.int8 and not np.any(w.zero_point) and layer.kind.startswith("conv")
    if w.per_tensor:
        q = graph.add_init(f"{base}_q", _layout(layer.native(codes), layout))
        s = graph.add_init(f"{base}_s", np.float32(w.scale[0, 0]))
        ins = (
            [q, s]
            if zero
            else [
                q,
                s,
                graph.add_init(f"{base}_z", np.asarray(w.zero_point[0, 0], dtype)),
            ]
        )
        return deq, [graph.node("DequantizeLinear", ins, [deq])]
    if w.scale.shape[1] == 1:  # per output channel
        q = graph.add_init(f"{base}_q", _layout(layer.native(codes), layout))
        s = graph.add_init(f"{base}_s", w.scale[:, 0].astype(np.float32))
        ins = (
            [q, s]
            if zero
            else [q, s, graph.add_init(f"{base}_z", w.zero_point[:, 0].astype(dtype))]
        )
        axis = layer.channel_axis if layout == "rows" else 1
        return deq, [graph.node("DequantizeLinear", ins, [deq], axis=axis)]
    # Groups along K: (codes − zero point) × scale on the (rows, groups, g) view in plain ops
    # (blocked DequantizeLinear needs opset 21, which the TorchScript exporter cannot write).
    # They read only initializers, so ONNX Runtime folds them into a float weight at load.
    rows, k = codes.shape
    groups = w.scale.shape[1]
    q = graph.add_init(f"{base}_q", codes.reshape(rows, groups, k // groups))
    s = graph.add_init(f"{base}_s", w.scale.astype(np.float32)[..., None])
    z = graph.add_init(f"{base}_z", w.zero_point.astype(np.float32)[..., None])
    shape = graph.add_init(f"{base}_shape", np.asarray(layer.rows_shape, np.int64))
    qf, centred, scaled = (graph.fresh(f"{base}_{x}") for x in ("float", "centred", "scaled"))
    moved = layout == "cols" or layer.channel_axis != 0
    nodes = [
        graph.node("Cast", [q], [qf], to=1),
        graph.node("Sub", [qf, z], [centred]),
        graph.node("Mul", [centred, s], [scaled]),
        graph.node("Reshape", [scaled, shape], [qf + "_rows" if moved else deq]),
    ]
    if layout == "cols":
        nodes.append(graph.node("Transpose", [qf + "_rows"], [deq], perm=[1, 0]))
    elif moved:  # rows along the channel axis back to the weight's layout
        nodes.append(graph.node("Transpose", [qf + "_rows"], [deq], perm=layer.rows_perm))
    return deq, nodes


def _bias_input(graph: _Graph, layer: _Layer, w: _WeightCodes, bias: np.ndarray, weight_scale: str):
    """int32 bias at scale s_x·s_w (what QLinearConv/QGemm take) when the layer quantizes its
    input and its weight scale is per tensor or per channel; float otherwise.

    The bias scale is written as Mul(s_x, s_w) of the initializers already there (ONNX Runtime
    folds it at load) and the zero point is left out (it defaults to 0), which keeps the file
    within a few percent of Σ params × bits / 8.
    """
    base = f"{layer.fqn}.b"
    if _full_range_8bit(layer.act) and w.scale.shape[1] == 1 and weight_scale:
        s = (np.float32(layer.act.scale) * w.scale[:, 0]).astype(np.float32)
        s = s[:1] if w.per_tensor else s
        q = np.round(bias.astype(np.float64) / s.astype(np.float64))
        if np.all(np.abs(q) < 2**31 - 1):
            qn = graph.add_init(f"{base}_q", q.astype(np.int32))
            sx = graph.add_init(f"{base}_sx", np.float32(layer.act.scale))
            sn, deq = graph.fresh(f"{base}_scale"), graph.fresh(f"{base}_dequantized")
            attrs = {} if w.per_tensor else {"axis": 0}
            return deq, [
                graph.node("Mul", [sx, weight_scale], [sn]),
                graph.node("DequantizeLinear", [qn, sn], [deq], **attrs),
            ]
    return graph.add_init(base, bias.astype(np.float32)), []


def _gather(graph: _Graph, n, layer: _Layer, w: _WeightCodes) -> list:
    """Embedding lookup on the int8 codes, then dequantize only the rows looked up."""
    dtype = _code_dtype(layer.qmin, layer.qmax)
    if dtype is None or w.scale.shape[1] != 1:
        n.input[0] = graph.add_init(f"{layer.fqn}.weight", w.dequantized().reshape(layer.shape))
        layer.status = "float (group-wise embedding)"
        return [n]
    base = f"{layer.fqn}.w"
    ids, out = n.input[1], n.output[0]
    q = graph.add_init(f"{base}_q", w.codes.astype(dtype).reshape(layer.shape))
    rows_q, rows_f = graph.fresh(f"{base}_rows_q"), graph.fresh(f"{base}_rows")
    nodes = [
        graph.node("Gather", [q, ids], [rows_q], axis=0),
        graph.node("Cast", [rows_q], [rows_f], to=1),
    ]
    if w.per_tensor:
        s = graph.add_init(f"{base}_s", np.float32(w.scale[0, 0]))
        z = graph.add_init(f"{base}_z", np.float32(w.zero_point[0, 0]))
        centred = graph.fresh(f"{base}_centred")
        nodes += [
            graph.node("Sub", [rows_f, z], [centred]),
            graph.node("Mul", [centred, s], [out]),
        ]
    else:
        s = graph.add_init(f"{base}_s", w.scale.astype(np.float32))  # (rows, 1)
        z = graph.add_init(f"{base}_z", w.zero_point.astype(np.float32))
        sr, zr, centred = (graph.fresh(f"{base}_{x}") for x in ("row_scale", "row_zp", "c"))
        nodes += [
            graph.node("Gather", [s, ids], [sr], axis=0),
            graph.node("Gather", [z, ids], [zr], axis=0),
            graph.node("Sub", [rows_f, zr], [centred]),
            graph.node("Mul", [centred, sr], [out]),
        ]
    layer.status = "int8 gather"
    return nodes
