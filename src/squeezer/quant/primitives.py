"""Pure tensor math of uniform affine quantization: no modules, no state, no hooks.

A real value x maps to an integer code q = clamp(round(x / s) + z, qmin, qmax) and back to
s · (q − z). Symmetric schemes fix z = 0 and use the narrow signed range [−(2^(b−1) − 1), 2^(b−1) − 1]
so that +a and −a quantize alike (and int8 codes never hit −128, which keeps integer
accumulation and ONNX Runtime's s8 kernels safe). Asymmetric schemes use [0, 2^b − 1].

Granularity decides which entries share one (scale, zero point):
``tensor`` (all), ``channel`` (each slice along the weight's channel axis, the output channel), or
``group`` (each run of ``group_size`` consecutive entries of a flattened output row). Every function
works on the "grouped view" ``(rows, groups, group_len)`` so the three cases are one code path.

The channel axis is dim 0 for Linear, Conv and Embedding weights and dim 1 for transposed
convolutions, whose weight is laid out (in_channels, out_channels / groups, k...): the grouped view
moves it to the front (:func:`grouped_view`) and :func:`ungrouped_view` moves it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import GRANULARITIES, OBSERVERS, check_bits  # noqa: F401  (declared with the configs)
from ..errors import ConfigError


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer code range for ``bits`` bits.

    Example:
        >>> qrange(8, True), qrange(8, False), qrange(4, True)
        ((-127, 127), (0, 255), (-7, 7))
    """
    check_bits(bits)
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


def grouped_view(
    x: torch.Tensor, granularity: str, group_size: int | None = None, channel_axis: int = 0
) -> torch.Tensor:
    """``x`` reshaped to (rows, groups, group_len) for the given granularity, rows running along
    ``channel_axis`` (moved to the front first; :func:`ungrouped_view` is the inverse).

    Example:
        >>> grouped_view(torch.zeros(6, 8), "group", 4).shape
        torch.Size([6, 2, 4])
        >>> grouped_view(torch.zeros(3, 5, 2), "channel", channel_axis=1).shape
        torch.Size([5, 1, 6])
    """
    if channel_axis:
        x = x.movedim(channel_axis, 0)
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], 1, -1)
    if granularity == "group":
        if not group_size or group_size < 1:
            raise ConfigError("granularity 'group' needs a positive group_size, e.g. group_size=64")
        row = x.reshape(x.shape[0], -1)
        if row.shape[1] % group_size:
            raise ConfigError(
                f"a row of {row.shape[1]} entries does not split into groups of {group_size}; "
                f"pick a group_size that divides {row.shape[1]}"
            )
        return row.reshape(x.shape[0], -1, group_size)
    raise ConfigError(
        f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
    )


def ungrouped_view(xg: torch.Tensor, shape: torch.Size, channel_axis: int = 0) -> torch.Tensor:
    """A grouped view of a tensor of ``shape`` back in that shape (the inverse of
    :func:`grouped_view` with the same ``channel_axis``).

    Example:
        >>> x = torch.arange(24.0).reshape(2, 3, 4)
        >>> torch.equal(ungrouped_view(grouped_view(x, "channel", channel_axis=1), x.shape, 1), x)
        True
    """
    if not channel_axis:
        return xg.reshape(shape)
    moved = (shape[channel_axis], *shape[:channel_axis], *shape[channel_axis + 1 :])
    return xg.reshape(moved).movedim(0, channel_axis)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point in grouped-view shape (rows, groups, 1), plus the code range."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    @property
    def bits(self) -> int:
        return int(round(math.log2(self.qmax - self.qmin + 1 + (1 if self.qmin < 0 else 0))))


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-12
) -> QParams:
    """Scale and zero point that map [lo, hi] (broadcast shapes) onto the code range.

    The range always includes 0, so zero is exactly representable (padding and ReLU zeros stay zero).
    """
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / qmax, min=eps)
        zp = torch.zeros_like(scale)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return QParams(scale.detach(), zp.detach(), qmin, qmax)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (as a float tensor of whole numbers) of ``x`` in grouped-view shape."""
    return torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Real values of the codes ``q``."""
    return (q - qp.zero_point) * qp.scale


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """dequantize(quantize(x)) with a straight-through estimator: gradients pass inside the clip
    range and are zero outside it (the clipped STE of QAT)."""
    q = round_ste(x / qp.scale) + qp.zero_point
    q = torch.clamp(q, qp.qmin, qp.qmax)
    return (q - qp.zero_point) * qp.scale


def observe(
    xg: torch.Tensor,
    bits: int,
    symmetric: bool,
    observer: str = "minmax",
    percentile: float = 99.99,
) -> QParams:
    """Quantization parameters for a grouped view ``xg`` (rows, groups, len), reduced over ``len``.

    Observers:
        ``minmax``: the exact range. ``percentile``: clip each side at the given percentile
        (robust to outliers in activations). ``mse``: the clipping ratio of the min-max range, from a
        grid of 50, that minimises the squared quantization error per group.
    """
    xg = xg.detach().float()
    if observer == "minmax":
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        return qparams_from_range(lo, hi, bits, symmetric)
    if observer == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=xg.dtype)
        flat = xg if xg.shape[-1] <= 2**24 else xg[..., torch.randperm(xg.shape[-1])[: 2**24]]
        lo, hi = torch.quantile(flat, q, dim=-1, keepdim=True).unbind(0)
        return qparams_from_range(lo, hi, bits, symmetric)
    if observer == "mse":
        lo0, hi0 = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        best_err = torch.full_like(lo0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for ratio in torch.linspace(0.3, 1.0, 50).tolist():
            qp = qparams_from_range(lo0 * ratio, hi0 * ratio, bits, symmetric)
            err = (dequantize(quantize(xg, qp), qp) - xg).pow(2).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo0 * ratio, best_lo)
            best_hi = torch.where(better, hi0 * ratio, best_hi)
        return qparams_from_range(best_lo, best_hi, bits, symmetric)
    raise ConfigError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    *,
    granularity: str = "channel",
    group_size: int | None = None,
    symmetric: bool = True,
    observer: str = "minmax",
    channel_axis: int = 0,
) -> tuple[torch.Tensor, QParams]:
    """Fake-quantized copy of a weight tensor and its parameters (grouped-view shaped; rows along
    ``channel_axis``, 1 for a transposed convolution's weight).

    Example:
        >>> w = torch.randn(16, 32)
        >>> wq, qp = quantize_weight(w, 4, granularity="group", group_size=8)
        >>> wq.shape == w.shape, qp.scale.shape
        (True, torch.Size([16, 4, 1]))
    """
    wg = grouped_view(w, granularity, group_size, channel_axis)
    qp = observe(wg, bits, symmetric, observer)
    return ungrouped_view(fake_quantize(wg, qp), w.shape, channel_axis), qp


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    noise = (x - xq).float().pow(2).sum()
    signal = x.float().pow(2).sum()
    return float(10 * torch.log10(signal / noise.clamp_min(1e-30)))
