"""The shift operation: a zero-FLOP, zero-parameter alternative to spatial convolutions (Wu et al.,
"Shift: A Zero FLOP, Zero Parameter Alternative to Spatial Convolutions", CVPR 2018,
arXiv:1711.08141).

Each channel is moved by one offset of a k × k neighbourhood, with zeros shifted in at the border;
the channels are split evenly into one group per offset (channels that do not divide evenly stay in
the centre group, unshifted). A 1 × 1 convolution after the shift then mixes what the neighbours
saw, so conv-shift-conv replaces a k × k convolution.

The original code builds a CUDA kernel through ``torch.utils.ffi`` (removed in PyTorch 1.0). Here
the shift is plain tensor arithmetic: a split of the channels into the offset groups, one constant
pad per group (negative on the side the group moves away from, which crops), one concatenation.
That is differentiable as it is, runs on any device, and exports to ONNX as ``Split``, ``Pad``
and ``Concat`` (with ``Slice``/``Reshape`` around the pad widths), which ONNX Runtime runs.

Example:
    >>> import torch
    >>> x = torch.arange(9.0).reshape(1, 1, 3, 3).repeat(1, 9, 1, 1)
    >>> y = Shift(9)(x)
    >>> y[0, 0].tolist()  # channel 0 takes the offset (-1, -1): each output reads its upper left
    [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 3.0, 4.0]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Offset patterns for a 3 × 3 neighbourhood: every offset, or the centre and its four neighbours
#: (the pattern DiracDeltaNet's hardware implements, arXiv:1811.08634).
PATTERNS = ("square", "cross")


def offsets(kernel_size: int = 3, pattern: str = "square") -> list[tuple[int, int]]:
    """The (dy, dx) offsets of a ``kernel_size`` × ``kernel_size`` shift, row by row.

    Example:
        >>> offsets(3, "cross")
        [(-1, 0), (0, -1), (0, 0), (0, 1), (1, 0)]
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    r = kernel_size // 2
    out = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    if pattern == "cross":
        out = [(dy, dx) for dy, dx in out if dy == 0 or dx == 0]
    return out


def channel_groups(
    channels: int, kernel_size: int = 3, pattern: str = "square"
) -> list[tuple[int, int, int, int]]:
    """``(first channel, end channel, dy, dx)`` of each offset group, in channel order.

    Every group gets ``channels // n_offsets`` channels; the remainder goes to the centre group
    (no shift), so fewer channels than offsets leave the others empty (and dropped).

    Example:
        >>> channel_groups(11, 3, "cross")
        [(0, 2, -1, 0), (2, 4, 0, -1), (4, 7, 0, 0), (7, 9, 0, 1), (9, 11, 1, 0)]
    """
    offs = offsets(kernel_size, pattern)
    per, extra = divmod(channels, len(offs))
    groups, c = [], 0
    for dy, dx in offs:
        n = per + (extra if (dy, dx) == (0, 0) else 0)
        if n:
            groups.append((c, c + n, dy, dx))
        c += n
    return groups


class Shift(nn.Module):
    """Shift each channel group of an (N, C, H, W) map by its offset, zero-filled; no parameters.

    ``out[:, c, i, j] = x[:, c, i + dy·d, j + dx·d]`` (0 outside the map), where (dy, dx) is the
    offset of the group that holds channel ``c`` (see :func:`channel_groups`) and ``d`` the
    dilation.

    Args:
        channels: input (and output) channels.
        kernel_size: the neighbourhood the offsets come from (odd).
        pattern: ``"square"`` (all k² offsets) or ``"cross"`` (centre and the four neighbours, k=3).
        dilation: offset multiplier.

    Example:
        >>> Shift(18)(torch.ones(2, 18, 5, 5)).shape
        torch.Size([2, 18, 5, 5])
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, pattern: str = "square", dilation: int = 1
    ):
        super().__init__()
        if pattern == "cross" and kernel_size != 3:
            raise ValueError("the cross pattern is defined for kernel_size=3")
        self.channels, self.kernel_size = channels, kernel_size
        self.pattern, self.dilation = pattern, dilation
        self.groups = channel_groups(channels, kernel_size, pattern)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, pattern={self.pattern!r}, "
            f"dilation={self.dilation}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.groups) == 1 and self.groups[0][2:] == (0, 0):
            return x
        d = self.dilation
        parts = torch.split(x, [c1 - c0 for c0, c1, _, _ in self.groups], dim=1)
        # out[i] = x[i + dy·d]: crop dy·d rows on one side, zero-pad them on the other, in one pad
        # with a negative and a positive width. Splitting first keeps the backward cheap (a
        # concatenation of gradients, where slicing one padded tensor per group would fill a
        # full-size zero gradient per group: 6x slower on CPU).
        # (parts are indexed, not iterated: torch.fx traces a split as one node of unknown length)
        shifted = [
            F.pad(parts[i], (-dx * d, dx * d, -dy * d, dy * d))
            for i, (_, _, dy, dx) in enumerate(self.groups)
        ]
        return torch.cat(shifted, dim=1)
