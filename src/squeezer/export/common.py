"""Constants of the ONNX export (the opset, MatMulNBits' block sizes, the ops quantization
commutes with, the default tolerance of the check) and the helpers all export modules share:
the check that onnx and onnxruntime are installed and the first line of an exception's message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ExportError

#: Opset of the exported graph.
OPSET = 17
MS_DOMAIN = "com.microsoft"
#: Ops through which fake quantization commutes: monotone, selecting or reshaping, and 0 → 0.
COMMUTING_OPS = frozenset(
    {"Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
)


def commutes(node: Any, constants: Any = None) -> bool:
    """Whether fake quantization commutes with ``node``: one of :data:`COMMUTING_OPS`, or a Pad
    that copies values (edge, reflect) or pads with the constant 0 (absent, or a zero
    initializer or Constant in ``constants``, name -> TensorProto), which every activation grid
    holds exactly. EfficientNet's "same"
    padding before its strided depthwise convs is such a Pad: quantized before it, ONNX Runtime
    runs the Pad and the conv feeding it in int8 (float otherwise)."""
    if node.op_type in COMMUTING_OPS:
        return True
    if node.op_type != "Pad":
        return False
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    if mode in ("edge", "reflect") or len(node.input) < 3 or not node.input[2]:
        return True
    if mode != "constant" or constants is None or node.input[2] not in constants:
        return False
    from onnx import numpy_helper

    return not numpy_helper.to_array(constants[node.input[2]]).any()
#: Default tolerance of the typical sample: max(steps × one 8-bit step of squeezer's output range,
#: share × max |squeezer − FP32|), as (steps, share), keyed by whether the export rounds more than
#: squeezer does (``requantize``, or an ``accuracy_level`` below fp32): its extra rounding may
#: add as much as the quantization itself did.
#: Measured: 0.3–0.9 step at worst on the digits nets; on MiniLM at W8A8 most sentences match
#: exactly and a few move by up to 15 steps after one flipped code
#: (see :func:`squeezer.export.export_onnx`).
ATOL = {False: (1.0, 0.1), True: (2.0, 1.0)}
#: Block sizes MatMulNBits accepts.
NBITS_BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class CheckedExport:
    """What every export writes and reports: the file, its size against the plan's theoretical
    size, and how well its runtime agrees with squeezer's simulation.

    Attributes:
        path: the written file.
        size_bytes: its size.
        theoretical_bytes: Σ params × bits / 8 at the plan's widths plus scales, zero points and the
            parts kept in float (``squeezer.measure.model_bytes``).
        max_abs_error: max |runtime − squeezer| over the checked outputs.
        median_sample_error: the median over samples of each sample's max |Δ|.
        atol: the tolerance it was checked against.
        output_step: one 8-bit step of the outputs' range, (max − min) / 255.
        quant_error: max |squeezer − FP32| over the checked samples: the quantization's own effect.
        argmax_agreement: share of rows whose argmax agrees (2-D outputs), else None.
    """

    path: str
    size_bytes: int
    theoretical_bytes: float
    max_abs_error: float | None
    median_sample_error: float | None
    atol: float | None
    output_step: float | None
    quant_error: float | None
    argmax_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs onnx and onnxruntime ({exc.name} is missing); "
            "pip install 'squeezer[onnx]'"
        ) from None

