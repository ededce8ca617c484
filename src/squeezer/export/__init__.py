"""ONNX export of squeezer's fake-quantized models as QDQ int8 graphs that ONNX Runtime runs with
integer kernels, checked against squeezer's own outputs before the file is written.

The graph is the operator form of uniform affine quantization (Jacob et al., "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", arXiv:1712.05877), the
deployment step of HAWQ-V3 (Yao et al., arXiv:2011.10680): QuantizeLinear/DequantizeLinear on every
activation a layer quantizes and DequantizeLinear on its integer weight codes, so that ONNX Runtime's
graph optimizer fuses each group into QLinearConv, QGemm or MatMulIntegerToFloat. Weight-only Linear
layers go to ONNX Runtime's block-quantized ``MatMulNBits`` (com.microsoft).

Modules: :mod:`.onnx` (:func:`export_onnx`, :func:`export_float_onnx`, :class:`ExportReport`),
:mod:`.rewrite` (the graph rewrite; its docstring says how the graph is built, pass by pass),
its passes :mod:`.match` (weight nodes back to layers), :mod:`.weights` (integer weight codes,
BatchNorm folding, biases), :mod:`.nbits` (MatMulNBits), :mod:`.activations` (Q/DQ of activations)
and :mod:`.fuse` (MatMulIntegerToFloat), the graph they share :mod:`.onnx_graph` and the stored
codes :mod:`.codes`; :mod:`.layers` (the Quant* layers in integer form and the float twin),
:mod:`.runtime` (ONNX Runtime sessions, feeds and latency) and :mod:`.common` (constants and
shared helpers).
"""

from .common import ATOL as ATOL
from .common import COMMUTING_OPS as COMMUTING_OPS
from .common import MS_DOMAIN as MS_DOMAIN
from .common import NBITS_BLOCKS as NBITS_BLOCKS
from .common import OPSET as OPSET
from .onnx import ExportReport, export_float_onnx, export_onnx
from .runtime import OrtModule, latency_table, ort_feeds, ort_session

__all__ = [
    "ExportReport",
    "OrtModule",
    "export_float_onnx",
    "export_onnx",
    "latency_table",
    "ort_feeds",
    "ort_session",
]
