"""Integer weight codes as the export stores them: :class:`_WeightCodes` (one weight's codes, rows
× K, with a scale and zero point per row and group, and BatchNorm folded into them), the ONNX
integer type that holds a code range (:func:`_code_dtype`), and the byte packing and layouts of
the stored codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import _Act, _Layer


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
    """Codes as the node holds its weight: as they are (``"rows"``) or transposed (``"cols"``)."""
    return codes if layout == "rows" else np.ascontiguousarray(codes.T)


def _full_range_8bit(act: _Act | None) -> bool:
    """True if ``act`` is a plain uint8/int8 QuantizeLinear (no clip): the case ONNX Runtime fuses
    into integer kernels, and the only one where an int32 bias (one more rounding) pays off."""
    if act is None:
        return False
    dtype = _code_dtype(act.qmin, act.qmax)
    return dtype is not None and (act.qmin, act.qmax) == (np.iinfo(dtype).min, np.iinfo(dtype).max)


def _unsigned_act(act: _Act | None) -> _Act | None:
    """``act`` with uint8 codes (codes and zero point + 128 where its codes fit int8: the same
    values), for ONNX Runtime's exact uint8 × uint8 kernels. Its int8 × int8 kernels on x86
    without VNNI flip the activation's sign bit (+128) and then multiply as uint8 × int8, which
    saturates (see :func:`~squeezer.export.runtime.u8s8_saturates`)."""
    if act is None or _code_dtype(act.qmin, act.qmax) != np.int8:
        return act
    return _Act(act.scale, act.zero_point + 128, act.qmin + 128, act.qmax + 128)


def _code_dtype(qmin: int, qmax: int):
    """int8 or uint8, whichever holds codes ``qmin..qmax``; None if neither does."""
    if qmin >= -128 and qmax <= 127:
        return np.int8
    if qmin >= 0 and qmax <= 255:
        return np.uint8
    return None
