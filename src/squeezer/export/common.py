"""Constants of the ONNX export (the opset, MatMulNBits' block sizes, the ops quantization
commutes with, the default tolerance of the check) and the helpers all export modules share:
the check that onnx and onnxruntime are installed and the first line of an exception's message.
"""

from __future__ import annotations

from ..errors import ExportError

#: Opset of the exported graph.
OPSET = 17
MS_DOMAIN = "com.microsoft"
#: Ops through which fake quantization commutes: monotone, selecting or reshaping, and 0 → 0.
COMMUTING_OPS = frozenset(
    {"Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
)
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


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs onnx and onnxruntime ({exc.name} is missing); "
            "pip install 'squeezer[onnx]'"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
