"""The rewrite that turns the float ONNX graph into the QDQ/MatMulNBits graph (:func:`_rewrite`),
pass by pass over one :class:`~.onnx_graph._Graph`.

How the graph is built:

1. The Quant* layers are swapped for float layers holding the dequantized weights, so the float graph
   computes squeezer's numbers, and torch.onnx's TorchScript exporter writes it, BatchNorm kept
   (:mod:`.layers`, :mod:`.onnx`).
2. Conv/ConvTranspose/Gemm/MatMul/Gather nodes are matched back to layers by the exact values of
   their weight initializers, which survives the exporter's renaming, transposing and
   de-duplication (:mod:`.match`).
3. Each matched weight becomes integer codes plus a DequantizeLinear, per tensor or per output channel
   (axis 0 of the layer's weight, axis 1 of a ConvTranspose's); group-wise codes are dequantized by
   Cast/Sub/Mul on initializers, which ONNX Runtime folds at load. A Conv followed by BatchNorm is
   folded: the codes stay, the per-channel scale absorbs |γ/σ| (codes mirrored where γ/σ < 0) and
   the bias absorbs the shift. Biases of layers whose inputs are 8-bit quantized are int32 at scale
   s_x·s_w, as QLinearConv and QGemm take them; with narrower activations the bias is a separate
   float Add. A ConvTranspose keeps a float kernel and its float bias: ONNX Runtime's CPU provider
   has no integer ConvTranspose (:mod:`.weights`). Weight-only Linears become ``MatMulNBits``
   (:mod:`.nbits`).
4. Quantization commutes with ReLU, MaxPool and reshapes (it is monotone and maps 0 to 0), so a
   tensor all of whose readers quantize it with the same parameters is quantized where it is produced
   as well. That places a QuantizeLinear right after the producing Conv/Gemm, which ONNX Runtime needs
   to fuse an integer op, without changing a single value (:mod:`.activations`).
5. Optionally (``requantize=True``) the tensors squeezer keeps in float between int8-capable ops
   (residual sums, pooled maps) are quantized to 8 bits with ranges observed on the example, so that
   every Conv and residual Add runs in int8, as ONNX Runtime's own static quantization does
   (:mod:`.activations`, ranges from :func:`~.runtime._observe_ranges`).
6. A MatMul reading an 8-bit quantized input and int8 weight codes becomes, with the bias Add after
   it, one ``MatMulIntegerToFloat`` (com.microsoft): ONNX Runtime would fuse the QDQ form into the
   same kernel but keep the bias as a separate Add, and a slower BiasGelu after it (:mod:`.fuse`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .activations import _ActQuantizers, _int8_inputs, _place_act_quantizers
from .codes import _unsigned_act
from .fuse import _fuse_integer_matmuls
from .layers import _Layer
from .onnx_graph import _Graph
from .runtime import _observe_ranges
from .weights import _rewrite_weights


def _rewrite(
    proto,
    layers: Mapping[str, _Layer],
    *,
    accuracy_level: int | None = None,
    requantize: bool = False,
    example: Any = None,
    threads: int = 1,
    weight_codes: str = "int8",
):
    """The QDQ/MatMulNBits ModelProto of the float graph ``proto`` (see the module docstring for
    the steps). Sets each layer's ``status`` (and ``block``) to how it was written. ``weight_codes``
    is ``"int8"`` or ``"uint8"``; with ``"uint8"`` every 8-bit activation quantizer has uint8
    codes (:func:`~.codes._unsigned_act`) and wide 8-bit weight codes too
    (:func:`~.weights._unsigned`)."""
    if weight_codes == "uint8":
        for layer in layers.values():
            layer.act = _unsigned_act(layer.act)
    graph = _Graph(proto)
    nodes, act_of = _rewrite_weights(
        graph, layers, accuracy_level=accuracy_level, weight_codes=weight_codes
    )
    quantizers = _ActQuantizers(graph)
    calib = None
    if requantize:
        names = _int8_inputs(graph, nodes, act_of)
        exact = graph.build(_place_act_quantizers(graph, nodes, act_of, quantizers), names)
        calib = _observe_ranges(exact, names, example, threads)
    placed = _place_act_quantizers(graph, nodes, act_of, quantizers, calib)
    return graph.build(_fuse_integer_matmuls(graph, placed))
