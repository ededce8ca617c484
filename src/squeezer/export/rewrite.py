"""The rewriter that turns the float ONNX graph into the QDQ/MatMulNBits graph
(:class:`_Rewriter`) and the graph helpers it uses: integer weight codes (:class:`_WeightCodes`),
code packing and layouts, ONNX attribute and consumer look-ups, renaming and topological sorting
of nodes.

How the graph is built:

1. The Quant* layers are swapped for float layers holding the dequantized weights, so the float graph
   computes squeezer's numbers, and torch.onnx's TorchScript exporter writes it (BatchNorm kept).
2. Conv/ConvTranspose/Gemm/MatMul/Gather nodes are matched back to layers by the exact values of
   their weight initializers, which survives the exporter's renaming, transposing and
   de-duplication.
3. Each matched weight becomes integer codes plus a DequantizeLinear, per tensor or per output channel
   (axis 0 of the layer's weight, axis 1 of a ConvTranspose's); group-wise codes are dequantized by
   Cast/Sub/Mul on initializers, which ONNX Runtime folds at load. A Conv followed by BatchNorm is
   folded: the codes stay, the per-channel scale absorbs |γ/σ| (codes mirrored where γ/σ < 0) and
   the bias absorbs the shift.
   Biases of layers whose inputs are 8-bit quantized are int32 at scale s_x·s_w, as QLinearConv and
   QGemm take them; with narrower activations the bias is a separate float Add (ONNX Runtime would
   otherwise round it to int32 itself, which at 4 bits moves outputs visibly). ONNX Runtime's CPU
   provider has no integer ConvTranspose (it leaves QDQ → ConvTranspose unfused and its float bias
   alone), so a ConvTranspose keeps DequantizeLinear on its weight codes, a float kernel and its
   float bias.
4. Quantization commutes with ReLU, MaxPool and reshapes (it is monotone and maps 0 to 0), so a
   tensor all of whose readers quantize it with the same parameters is quantized where it is produced
   as well. That places a QuantizeLinear right after the producing Conv/Gemm, which ONNX Runtime needs
   to fuse an integer op, without changing a single value.
5. Optionally (``requantize=True``) the tensors squeezer keeps in float between int8-capable ops
   (residual sums, pooled maps) are quantized to 8 bits with ranges observed on the example, so that
   every Conv and residual Add runs in int8, as ONNX Runtime's own static quantization does.
6. A MatMul reading an 8-bit quantized input and int8 weight codes becomes, with the bias Add after
   it, one ``MatMulIntegerToFloat`` (com.microsoft): ONNX Runtime would fuse the QDQ form into the
   same kernel but keep the bias as a separate Add (and a slower BiasGelu after it).

Mapping to ``MatMulNBits`` (codes in blocks along K, ``(code − zero point) × scale``): squeezer's
symmetric b-bit codes q are stored as q + 2^(B−1) (B = 4 up to 4 bits, else 8) with the default zero
point 2^(B−1); asymmetric codes and their zero points are stored as they are. Groups of
g ∈ {16, …, 256} entries along a row map to blocks of g; per-channel and per-tensor scales are
repeated over the row's blocks. Other layers keep their codes in int8 QDQ (sub-8-bit codes still
take a byte each there).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ExportError
from .common import COMMUTING_OPS, MS_DOMAIN, NBITS_BLOCKS, OPSET
from .layers import _Act, _Layer
from .runtime import _observe_ranges


def _digest(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a)
    return (a.shape, str(a.dtype), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest())


class _Rewriter:
    """Turns the float graph into the QDQ/MatMulNBits graph. One instance per export."""

    def __init__(self, proto, layers: Mapping[str, _Layer], *, accuracy_level: int | None = None):
        from onnx import numpy_helper

        self.proto, self.g, self.layers = proto, proto.graph, layers
        self.accuracy_level = accuracy_level
        self.inits = {t.name: t for t in self.g.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.new_inits: list = []
        self.opset = OPSET
        self.uses_ms = False
        self.np = numpy_helper
        names = {t.name for t in self.g.initializer}
        for n in self.g.node:
            names.update(n.input)
            names.update(n.output)
        self.names = names | {i.name for i in self.g.input}
        self.act_of: dict[int, _Act] = {}  # id(node) -> activation quantizer of its input 0
        self._act_inits: dict[_Act, tuple[str, str]] = {}
        # weight lookup: digest of the array as a node holds it -> [(layer, layout)]
        self.index: dict[tuple, list[tuple[_Layer, str]]] = {}
        for layer in layers.values():
            views = {"rows": layer.weight}
            if layer.kind == "linear":
                views["cols"] = np.ascontiguousarray(layer.weight.T)
            for layout, arr in views.items():
                self.index.setdefault(_digest(arr), []).append((layer, layout))

    # -- helpers ------------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = self.np.to_array(self.inits[name])
        return self._arrays[name]

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        t = self.np.from_array(np.array(arr, copy=True, order="C"), name)  # keeps 0-d as 0-d
        self.new_inits.append(t)
        self.inits[name] = t
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper

        domain = MS_DOMAIN if op == "MatMulNBits" else ""
        return helper.make_node(op, inputs, outputs, domain=domain, **attrs)

    def resolve(self, name: str, producers: Mapping[str, Any]) -> str | None:
        """The initializer behind ``name``, following Identity nodes."""
        seen = 0
        while name not in self.inits and seen < 8:
            p = producers.get(name)
            if p is None or p.op_type != "Identity":
                return None
            name, seen = p.input[0], seen + 1
        return name if name in self.inits else None

    # -- pass 1: weights ----------------------------------------------------------------------

    def match(self, node, producers) -> tuple[_Layer, str] | None:
        op = node.op_type
        if op in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            idx = 1
        elif op == "Gather" and _attr(node, "axis", 0) == 0:
            idx = 0
        else:
            return None
        if len(node.input) <= idx:
            return None
        init = self.resolve(node.input[idx], producers)
        if init is None:
            return None
        arr = self.array(init)
        want = {"Conv": "rows", "ConvTranspose": "rows", "Gather": "rows", "MatMul": "cols"}.get(op)
        if op == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
                return None
            want = "rows" if _attr(node, "transB", 0) else "cols"
        for layer, layout in self.index.get(_digest(arr), []):
            kind_ok = {
                "Conv": "conv",
                "ConvTranspose": "conv_transpose",
                "Gather": "embedding",
                "Gemm": "linear",
                "MatMul": "linear",
            }[op] == layer.kind
            if kind_ok and layout == want and np.array_equal(arr, self.weight_view(layer, layout)):
                return layer, layout
        return None

    @staticmethod
    def weight_view(layer: _Layer, layout: str) -> np.ndarray:
        return layer.weight if layout == "rows" else layer.weight.T

    def run(self, *, requantize: bool = False, example: Any = None, threads: int = 1):
        """The rewritten ModelProto (see the module docstring for the steps)."""
        nodes = list(self.g.node)
        producers, consumers = _producers_consumers(nodes)
        outputs = {o.name for o in self.g.output}
        dropped: set[int] = set()
        new_nodes = []
        for n in nodes:
            if id(n) in dropped:
                continue
            hit = self.match(n, producers)
            if hit is None:
                new_nodes.append(n)
                continue
            layer, layout = hit
            w = _WeightCodes.of(layer)
            # the bias as an array; None when there is none or it is computed (then left alone)
            has_bias = len(n.input) > 2 and bool(n.input[2])
            bias = self.array(self.resolve(n.input[2], producers) or "") if has_bias else None
            if n.op_type == "Conv" and (bias is not None or not has_bias):
                bn = _single_consumer(n.output[0], consumers, outputs)
                if bn is not None and bn.op_type == "BatchNormalization":
                    folded = self.fold_bn(w, bias, bn, producers)
                    if folded is not None:
                        w, bias = folded
                        dropped.add(id(bn))
                        n.output[0] = bn.output[0]
            new_nodes.extend(self.rewrite(n, layer, layout, w, bias))
        calib = None
        if requantize:
            names = self.int8_inputs(new_nodes)
            exact = self.build(self.act_pass(new_nodes), extra_outputs=names)
            calib = _observe_ranges(exact, names, example, threads)
        return self.build(self.fuse_integer_matmuls(self.act_pass(new_nodes, calib)))

    def fold_bn(self, w: _WeightCodes, bias: np.ndarray | None, bn, producers):
        if len([o for o in bn.output if o]) != 1 or _attr(bn, "training_mode", 0):
            return None
        params = [self.array(self.resolve(x, producers) or "") for x in bn.input[1:5]]
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

    def rewrite(self, n, layer: _Layer, layout: str, w: _WeightCodes, bias: np.ndarray | None):
        """The nodes replacing ``n``: weight DequantizeLinear (or MatMulNBits), quantized bias."""
        out = []
        if n.op_type == "Gather":
            return self.gather(n, layer, w)
        if (
            layer.kind == "linear"
            and (layer.act is None or _code_dtype(layer.act.qmin, layer.act.qmax) is None)
            and layer.qmax - layer.qmin <= 255
            and (n.op_type == "MatMul" or (n.op_type == "Gemm" and layout == "rows"))
            and _attr(n, "beta", 1.0) == 1.0
        ):
            nb = self.matmul_nbits(n, layer, w, bias)
            if nb is not None:
                return nb
        dtype = _code_dtype(layer.qmin, layer.qmax)
        base = f"{layer.fqn}.weight"
        wscale = ""
        if dtype is None:  # codes wider than 8 bits: keep the dequantized weight in float
            arr = layer.native(w.dequantized())
            arr = arr if layout == "rows" else arr.T
            n.input[1] = self.add_init(base, arr.astype(np.float32))
            layer.status = f"float ({layer.spec.bits}-bit codes do not fit int8)"
        else:
            n.input[1], extra = self.weight_dq(layer, layout, w, dtype, base)
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
                b = self.add_init(f"{layer.fqn}.bias", bias.astype(np.float32).reshape(shape))
                y, n_in[2] = n.output[0], ""
                n.output[0] = self.fresh(f"{y}_without_bias")
                after.append(self.node("Add", [n.output[0], b], [y]))
            else:
                n_in[2], extra = self.bias_input(layer, w, bias, wscale)
                out.extend(extra)
            while n_in and not n_in[-1]:
                n_in.pop()
            del n.input[:]
            n.input.extend(n_in)
        if layer.act is not None:
            self.act_of[id(n)] = layer.act
        return [*out, n, *after]

    def weight_dq(self, layer: _Layer, layout: str, w: _WeightCodes, dtype, base: str):
        """(name of the dequantized weight, nodes making it)."""
        codes = w.codes.astype(dtype)
        deq = self.fresh(f"{base}_dequantized")
        # int8 codes are symmetric here (zero point 0, the default): no zero-point initializer
        zero = dtype == np.int8 and not np.any(w.zero_point) and layer.kind.startswith("conv")
        if w.per_tensor:
            q = self.add_init(f"{base}_quantized", _layout(layer.native(codes), layout))
            s = self.add_init(f"{base}_scale", np.float32(w.scale[0, 0]))
            ins = (
                [q, s]
                if zero
                else [
                    q,
                    s,
                    self.add_init(f"{base}_zero_point", np.asarray(w.zero_point[0, 0], dtype)),
                ]
            )
            return deq, [self.node("DequantizeLinear", ins, [deq])]
        if w.scale.shape[1] == 1:  # per output channel
            q = self.add_init(f"{base}_quantized", _layout(layer.native(codes), layout))
            s = self.add_init(f"{base}_scale", w.scale[:, 0].astype(np.float32))
            ins = (
                [q, s]
                if zero
                else [q, s, self.add_init(f"{base}_zero_point", w.zero_point[:, 0].astype(dtype))]
            )
            axis = layer.channel_axis if layout == "rows" else 1
            return deq, [self.node("DequantizeLinear", ins, [deq], axis=axis)]
        # Groups along K: (codes − zero point) × scale on the (rows, groups, g) view in plain ops
        # (blocked DequantizeLinear needs opset 21, which the TorchScript exporter cannot write).
        # They read only initializers, so ONNX Runtime folds them into a float weight at load.
        rows, k = codes.shape
        groups = w.scale.shape[1]
        q = self.add_init(f"{base}_quantized", codes.reshape(rows, groups, k // groups))
        s = self.add_init(f"{base}_scale", w.scale.astype(np.float32)[..., None])
        z = self.add_init(f"{base}_zero_point", w.zero_point.astype(np.float32)[..., None])
        shape = self.add_init(f"{base}_shape", np.asarray(layer.rows_shape, np.int64))
        qf, centred, scaled = (self.fresh(f"{base}_{x}") for x in ("float", "centred", "scaled"))
        moved = layout == "cols" or layer.channel_axis != 0
        nodes = [
            self.node("Cast", [q], [qf], to=1),
            self.node("Sub", [qf, z], [centred]),
            self.node("Mul", [centred, s], [scaled]),
            self.node("Reshape", [scaled, shape], [qf + "_rows" if moved else deq]),
        ]
        if layout == "cols":
            nodes.append(self.node("Transpose", [qf + "_rows"], [deq], perm=[1, 0]))
        elif moved:  # rows along the channel axis back to the weight's layout
            nodes.append(self.node("Transpose", [qf + "_rows"], [deq], perm=layer.rows_perm))
        return deq, nodes

    def bias_input(self, layer: _Layer, w: _WeightCodes, bias: np.ndarray, weight_scale: str):
        """int32 bias at scale s_x·s_w (what QLinearConv/QGemm take) when the layer quantizes its
        input and its weight scale is per tensor or per channel; float otherwise.

        The bias scale is written as Mul(s_x, s_w) of the initializers already there (ONNX Runtime
        folds it at load) and the zero point is left out (it defaults to 0), which keeps the file
        within a few percent of Σ params × bits / 8.
        """
        base = f"{layer.fqn}.bias"
        if _full_range_8bit(layer.act) and w.scale.shape[1] == 1 and weight_scale:
            s = (np.float32(layer.act.scale) * w.scale[:, 0]).astype(np.float32)
            s = s[:1] if w.per_tensor else s
            q = np.round(bias.astype(np.float64) / s.astype(np.float64))
            if np.all(np.abs(q) < 2**31 - 1):
                qn = self.add_init(f"{base}_quantized", q.astype(np.int32))
                sx = self.add_init(f"{base}_input_scale", np.float32(layer.act.scale))
                sn, deq = self.fresh(f"{base}_scale"), self.fresh(f"{base}_dequantized")
                attrs = {} if w.per_tensor else {"axis": 0}
                return deq, [
                    self.node("Mul", [sx, weight_scale], [sn]),
                    self.node("DequantizeLinear", [qn, sn], [deq], **attrs),
                ]
        return self.add_init(base, bias.astype(np.float32)), []

    def matmul_nbits(self, n, layer: _Layer, w: _WeightCodes, bias: np.ndarray | None):
        """A MatMulNBits node (4-bit codes up to 4 bits, else 8-bit) for a weight-only Linear, or
        None if the layout does not fit (then the caller falls back to int8 QDQ).

        Weight-only layers go here even at 8 bits: left as DequantizeLinear → MatMul, ONNX Runtime
        turns them into MatMulNBits itself with ``accuracy_level`` 4, which quantizes the float
        input to int8 on the fly (measured: ~0.5 output step off squeezer). The nodes written
        here leave ``accuracy_level`` unset unless asked, so the input stays float, as squeezer
        computes it.
        """
        bits = 4 if layer.qmax - layer.qmin <= 15 else 8
        rows, k = w.codes.shape
        groups = w.scale.shape[1]
        if groups > 1:
            block = k // groups
            if block not in NBITS_BLOCKS:
                return None
            scale, zp = w.scale, w.zero_point
        else:
            fits = [b for b in NBITS_BLOCKS if k % b == 0]
            block = fits[-1] if fits else min([b for b in NBITS_BLOCKS if b >= k] or [32])
            nb = math.ceil(k / block)
            scale = np.repeat(w.scale, nb, axis=1)
            zp = np.repeat(w.zero_point, nb, axis=1)
        nb = scale.shape[1]
        symmetric = layer.qmin < 0
        offset = 2 ** (bits - 1)  # MatMulNBits' default zero point
        u = w.codes + offset if symmetric else w.codes.copy()
        pad_value = offset if symmetric else zp[:, -1:]
        if nb * block > k:
            pad = np.broadcast_to(pad_value, (rows, nb * block - k))
            u = np.concatenate([u, pad], axis=1)
        if u.min() < 0 or u.max() >= 2**bits:
            return None
        u = u.astype(np.uint8).reshape(rows, nb, block)
        base = f"{layer.fqn}.weight"
        ins = [
            n.input[0],
            self.add_init(f"{base}_q{bits}", _pack(u, bits)),
            self.add_init(f"{base}_scales", scale.astype(np.float32).reshape(-1)),
        ]
        if symmetric:
            ins.append("")
        else:
            z = _pack(zp.astype(np.uint8), bits).reshape(-1)  # packed per row
            ins.append(self.add_init(f"{base}_zero_points", z))
        if bias is not None:
            ins += ["", self.add_init(f"{layer.fqn}.bias", bias.astype(np.float32))]
        self.uses_ms = True
        layer.status, layer.block = f"matmulnbits-{bits}", int(block)
        node = self.node(
            "MatMulNBits",
            ins,
            [n.output[0]],
            K=int(k),
            N=int(rows),
            bits=bits,
            block_size=int(block),
            **({} if self.accuracy_level is None else {"accuracy_level": int(self.accuracy_level)}),
            name=n.name,
        )
        return [node]

    def gather(self, n, layer: _Layer, w: _WeightCodes):
        """Embedding lookup on the int8 codes, then dequantize only the rows looked up."""
        dtype = _code_dtype(layer.qmin, layer.qmax)
        if dtype is None or w.scale.shape[1] != 1:
            n.input[0] = self.add_init(f"{layer.fqn}.weight", w.dequantized().reshape(layer.shape))
            layer.status = "float (group-wise embedding)"
            return [n]
        base = f"{layer.fqn}.weight"
        ids, out = n.input[1], n.output[0]
        q = self.add_init(f"{base}_quantized", w.codes.astype(dtype).reshape(layer.shape))
        rows_q, rows_f = self.fresh(f"{base}_rows_q"), self.fresh(f"{base}_rows")
        nodes = [
            self.node("Gather", [q, ids], [rows_q], axis=0),
            self.node("Cast", [rows_q], [rows_f], to=1),
        ]
        if w.per_tensor:
            s = self.add_init(f"{base}_scale", np.float32(w.scale[0, 0]))
            z = self.add_init(f"{base}_zero_point", np.float32(w.zero_point[0, 0]))
            centred = self.fresh(f"{base}_centred")
            nodes += [
                self.node("Sub", [rows_f, z], [centred]),
                self.node("Mul", [centred, s], [out]),
            ]
        else:
            s = self.add_init(f"{base}_scale", w.scale.astype(np.float32))  # (rows, 1)
            z = self.add_init(f"{base}_zero_point", w.zero_point.astype(np.float32))
            sr, zr, centred = (self.fresh(f"{base}_{x}") for x in ("row_scale", "row_zp", "c"))
            nodes += [
                self.node("Gather", [s, ids], [sr], axis=0),
                self.node("Gather", [z, ids], [zr], axis=0),
                self.node("Sub", [rows_f, zr], [centred]),
                self.node("Mul", [centred, sr], [out]),
            ]
        layer.status = "int8 gather"
        return nodes

    # -- pass 2: activations ------------------------------------------------------------------

    def act_pass(self, nodes: list, calib: Mapping[str, _Act] | None = None) -> list:
        """Copies of ``nodes`` with the activation quantizers put in.

        A tensor is quantized where it is produced when every use of it (through commuting ops)
        applies the same squeezer quantizer. With ``calib`` (requantize mode) a tensor also takes
        the quantizer of a layer that reads it when its other readers are int8-capable ops, and a
        tensor read only by int8-capable ops (residual Add, pooling, Concat) takes its calibrated
        8-bit quantizer from ``calib``.
        """
        from onnx import NodeProto

        act_of: dict[int, _Act] = {}
        copies = []
        for n in nodes:
            c = NodeProto()
            c.CopyFrom(n)
            copies.append(c)
            if id(n) in self.act_of:
                act_of[id(c)] = self.act_of[id(n)]
        nodes = copies
        outputs = {o.name for o in self.g.output}

        def planner(nodes: list):
            consumers: dict[str, list[tuple[Any, int]]] = {}
            for n in nodes:
                for i, x in enumerate(n.input):
                    consumers.setdefault(x, []).append((n, i))
            memo: dict[str, tuple[_Act | None, str]] = {}

            def wanted(t: str) -> tuple[_Act | None, str]:
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
                    elif (
                        i == 0
                        and c.op_type in COMMUTING_OPS
                        and len([o for o in c.output if o]) == 1
                    ):
                        act, kind = wanted(c.output[0])
                        if kind == "layer":
                            hard.add(act)
                        elif kind == "calib":
                            soft.add(act)
                        else:
                            other = True
                    elif calib is not None and t in calib and _int8_capable(c, self.inits):
                        soft.add(calib[t])
                    else:
                        other = True
                if other or len(hard) > 1:
                    memo[t] = (None, "none")
                elif hard:  # readers that are not layers are int8-capable ops (requantize mode)
                    memo[t] = (hard.pop(), "layer")
                elif len(soft) == 1:
                    memo[t] = (soft.pop(), "calib")
                else:
                    memo[t] = (None, "none")
                return memo[t]

            return consumers, wanted

        consumers, wanted = planner(nodes)
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
                        calib = {**calib, n.input[0]: calib[n.output[0]]}
        if drop:
            nodes = [n for n in nodes if id(n) not in drop]
            consumers, wanted = planner(nodes)

        tensors = [i.name for i in self.g.input if i.name not in self.inits]
        tensors += [o for n in nodes for o in n.output if o]
        extra = []
        fq: set[str] = set()
        for t in tensors:
            act, _ = wanted(t)
            if act is None:
                continue
            qt, made = self.quantize_act(t, act)
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
                private[key], made = self.quantize_act(n.input[0], act)
                extra += made
            n.input[0] = private[key]
        return _toposort(nodes + extra, self.g, self.inits)

    def fuse_integer_matmuls(self, nodes: list) -> list:
        """Each MatMul that reads an 8-bit quantized activation and int8 weight codes (per tensor
        or per output column), together with the bias Add that follows it, as one
        ``MatMulIntegerToFloat`` (com.microsoft) taking the integer tensors and the bias.

        ONNX Runtime fuses the QDQ form into the same kernel but leaves the bias as a separate
        Add, which then fuses with a following GELU into a slower BiasGelu; on MiniLM at batch 32
        those Adds and BiasGelus cost more than the integer matmuls gain (docs/benchmarks.md,
        Deployment). The computation is the one the QDQ graph describes.
        """
        producers, consumers = _producers_consumers(nodes)
        outputs = {o.name for o in self.g.output}
        replaced: dict[int, Any] = {}
        dropped: set[int] = set()
        for n in nodes:
            if n.op_type != "MatMul":
                continue
            a_dq, b_dq = producers.get(n.input[0]), producers.get(n.input[1])
            if not (
                a_dq is not None
                and b_dq is not None
                and a_dq.op_type == b_dq.op_type == "DequantizeLinear"
                and len(a_dq.input) == 3
                and all(x in self.inits for x in a_dq.input[1:])
                and self.array(a_dq.input[1]).ndim == 0
                and producers.get(a_dq.input[0]) is not None
                and producers[a_dq.input[0]].op_type == "QuantizeLinear"
                and b_dq.input[0] in self.inits
                and all(x in self.inits for x in b_dq.input[1:] if x)
            ):
                continue
            codes, w_scale = self.array(b_dq.input[0]), self.array(b_dq.input[1])
            if codes.dtype != np.int8 or codes.ndim != 2:
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
                b = self.array(other)
                if b is not None and b.dtype == np.float32 and b.shape == (codes.shape[1],):
                    out, bias = add.output[0], other
                    dropped.add(id(add))
            w_zero = b_dq.input[2] if len(b_dq.input) > 2 else ""
            ins = [a_dq.input[0], b_dq.input[0], a_dq.input[1], b_dq.input[1], a_dq.input[2]]
            ins += [w_zero, bias]
            while not ins[-1]:
                ins.pop()
            from onnx import helper

            replaced[id(n)] = helper.make_node(
                "MatMulIntegerToFloat", ins, [out], domain=MS_DOMAIN, name=n.name
            )
            self.uses_ms = True
        if not replaced:
            return nodes
        kept = [replaced.get(id(n), n) for n in nodes if id(n) not in dropped]
        return _toposort(kept, self.g, self.inits)

    def int8_inputs(self, nodes: list) -> list[str]:
        """Tensors read by int8-capable ops (requantize mode calibrates their ranges)."""
        outputs = {o.name for o in self.g.output}
        names = []
        for n in nodes:
            if _int8_capable(n, self.inits):
                for x in n.input:
                    if x and x not in self.inits and x not in outputs and x not in names:
                        names.append(x)
        return names

    def quantize_act(self, t: str, act: _Act) -> tuple[str, list]:
        """Q/DQ (or exact float fake-quant for > 8 bits) of tensor ``t``; returns the new name."""
        dtype = _code_dtype(act.qmin, act.qmax)
        if act not in self._act_inits:
            i = len(self._act_inits)
            zdt = dtype if dtype is not None else np.float32
            self._act_inits[act] = (
                self.add_init(f"act{i}_scale", np.float32(act.scale)),
                self.add_init(f"act{i}_zero_point", np.asarray(act.zero_point, zdt)),
            )
        s, z = self._act_inits[act]
        src, nodes = t, []
        out = self.fresh(f"{t}_fq")
        if dtype is None:  # > 8-bit codes: the fake-quant formula in float ops, exactly
            lo = self.add_init("qmin", np.float32(act.qmin))
            hi = self.add_init("qmax", np.float32(act.qmax))
            a, b, c, d, e = (self.fresh(f"{t}_fq{k}") for k in range(5))
            nodes += [
                self.node("Div", [src, s], [a]),
                self.node("Round", [a], [b]),
                self.node("Add", [b, z], [c]),
                self.node("Clip", [c, lo, hi], [d]),
                self.node("Sub", [d, z], [e]),
                self.node("Mul", [e, s], [out]),
            ]
            return out, nodes
        info = np.iinfo(dtype)
        if (act.qmin, act.qmax) != (info.min, info.max):  # a narrower range: clip before Q
            lo = self.add_init("clip_lo", np.float32((act.qmin - act.zero_point) * act.scale))
            hi = self.add_init("clip_hi", np.float32((act.qmax - act.zero_point) * act.scale))
            clipped = self.fresh(f"{t}_clipped")
            nodes.append(self.node("Clip", [src, lo, hi], [clipped]))
            src = clipped
        q = self.fresh(f"{t}_quantized")
        nodes += [
            self.node("QuantizeLinear", [src, s, z], [q]),
            self.node("DequantizeLinear", [q, s, z], [out]),
        ]
        return out, nodes

    # -- output -------------------------------------------------------------------------------

    def build(self, nodes: list, extra_outputs: list[str] = ()):
        """A ModelProto of ``nodes`` with the initializers they use, dead nodes dropped.
        ``extra_outputs`` are left untyped: a Concat of shape slices (``x.flatten(1, 2)``) reads
        int64 tensors, which ONNX Runtime refuses as float outputs (the caller skips them)."""
        from onnx import helper

        outputs = list(self.g.output) + [
            helper.make_empty_tensor_value_info(t) for t in extra_outputs
        ]
        out_names = {o.name for o in outputs}
        while True:  # drop nodes nobody reads (Identity nodes of replaced weights), repeatedly
            used = {x for n in nodes for x in n.input} | out_names
            keep = [n for n in nodes if any(o in used for o in n.output)]
            if len(keep) == len(nodes):
                break
            nodes = keep
        inits, seen = [], set()
        for t in list(self.g.initializer) + self.new_inits:
            if t.name in used and t.name not in seen:
                seen.add(t.name)
                inits.append(t)
        if not extra_outputs:
            _short_names(nodes, keep={*(i.name for i in self.g.input), *out_names, *seen})
        graph = helper.make_graph(
            nodes, self.g.name or "squeezer", list(self.g.input), outputs, initializer=inits
        )
        opsets = [helper.make_opsetid("", self.opset)]
        if self.uses_ms:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="squeezer",
            ir_version=self.proto.ir_version,  # ONNX Runtime rejects the newest IR versions
        )
        return model


def _producers_consumers(nodes: list) -> tuple[dict[str, Any], dict[str, list]]:
    """{tensor: the node writing it} and {tensor: the nodes reading it}."""
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    return producers, consumers


def _short_names(nodes: list, keep: set[str]) -> None:
    """Rename intermediate tensors t0, t1, ... in place (node names keep the module scopes): on a
    small net the exporter's scoped tensor names are a few percent of the file."""
    names: dict[str, str] = {}
    for n in nodes:
        for j, x in enumerate(n.output):
            if x and x not in keep:
                names.setdefault(x, f"t{len(names)}")
                n.output[j] = names[x]
    for n in nodes:
        for j, x in enumerate(n.input):
            if x in names:
                n.input[j] = names[x]


def _int8_capable(node, inits: Mapping[str, Any]) -> bool:
    """Ops ONNX Runtime runs on int8 tensors in a QDQ graph: a residual Add of two computed
    tensors, pooling, Concat."""
    if node.op_type == "Add":
        return all(x and x not in inits for x in node.input)
    return node.op_type in ("GlobalAveragePool", "AveragePool", "Concat")


@dataclass
class _WeightCodes:
    """Integer codes of one weight as rows × K, with per-(row, group) scale and zero point."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    per_tensor: bool

    @classmethod
    def of(cls, layer: _Layer) -> _WeightCodes:
        return cls(
            layer.codes.copy(),
            layer.scale.copy(),
            layer.zero_point.copy(),
            layer.qmin,
            layer.qmax,
            layer.per_tensor,
        )

    def scaled(self, f: np.ndarray) -> _WeightCodes:
        """The codes of ``W · diag(f)`` over rows: same codes (negated where f < 0), scale × |f|."""
        neg = f < 0
        codes, zp = self.codes.copy(), self.zero_point.copy()
        codes[neg] = (self.qmin + self.qmax) - codes[neg]
        zp[neg] = (self.qmin + self.qmax) - zp[neg]
        scale = (self.scale.astype(np.float64) * np.abs(f)[:, None]).astype(np.float32)
        return _WeightCodes(codes, scale, zp, self.qmin, self.qmax, per_tensor=False)

    def dequantized(self) -> np.ndarray:
        g = self.scale.shape[1]
        c = self.codes.reshape(self.codes.shape[0], g, -1).astype(np.float32)
        z = self.zero_point.astype(np.float32)[..., None]
        return ((c - z) * self.scale[..., None]).reshape(self.codes.shape).astype(np.float32)


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Codes packed low-first along the last axis: two 4-bit codes a byte, or one 8-bit code."""
    if bits == 8:
        return u.astype(np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), u.dtype)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _layout(codes: np.ndarray, layout: str) -> np.ndarray:
    return codes if layout == "rows" else np.ascontiguousarray(codes.T)


def _full_range_8bit(act: _Act | None) -> bool:
    """True if ``act`` is a plain uint8/int8 QuantizeLinear (no clip): the case ONNX Runtime fuses
    into integer kernels, and the only one where an int32 bias (one more rounding) pays off."""
    if act is None:
        return False
    dtype = _code_dtype(act.qmin, act.qmax)
    return dtype is not None and (act.qmin, act.qmax) == (np.iinfo(dtype).min, np.iinfo(dtype).max)


def _code_dtype(qmin: int, qmax: int):
    if qmin >= -128 and qmax <= 127:
        return np.int8
    if qmin >= 0 and qmax <= 255:
        return np.uint8
    return None


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _single_consumer(t: str, consumers: Mapping[str, list], outputs: set[str]):
    users = consumers.get(t, [])
    return users[0] if len(users) == 1 and t not in outputs else None


def _toposort(nodes: list, graph, inits: Mapping[str, Any]) -> list:
    """Nodes in an order where every input is produced before it is read (stable otherwise)."""
    available = set(inits) | {i.name for i in graph.input} | {""}
    pending, done = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(x in available for x in n.input):
                done.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(
                f"the rewritten graph has a cycle or a dangling input near {rest[0].op_type} "
                f"{rest[0].name!r}"
            )
        pending = rest
    return done
