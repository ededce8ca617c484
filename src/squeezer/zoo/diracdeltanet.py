"""DiracDeltaNet (Yang et al., "Synetgy: Algorithm-hardware Co-design for ConvNet Accelerators on
Embedded FPGAs", FPGA 2019, arXiv:1811.08634, Sec. 3).

ShuffleNet V2's macro-architecture (Ma et al., arXiv:1807.11164) cut down to the operators an FPGA
accelerator implements cheaply: 1 × 1 convolutions, 2 × 2 max pooling, shifts, channel
concatenation and a shift-based channel shuffle. Every 3 × 3 (depthwise) convolution becomes a
:class:`~squeezer.zoo.shift.Shift` between 1 × 1 convolutions; every stride-2 convolution becomes a
2 × 2 max pool; the transpose-based channel shuffle becomes a rotation of the channels by a quarter
(a slice-and-concatenate, "shift" along the channel axis). The paper quantizes it to 4-bit weights
and 4-bit activations with under 1% top-5 loss.

Layout here (ImageNet, 224 × 224): a 1 × 1 stem to 32 channels, 2 × 2 pool, shift, 1 × 1 to 64, 2 × 2
pool, shift; three stages of 4, 8, 4 units at 116, 232, 464 channels (ShuffleNet V2 1×), each
stage's first unit halving the resolution; a 1 × 1 conv to 1024, global pooling, linear. In a unit
the 1 × 1 expansion inside the shift branch is ``expansion`` × half the unit's channels (2 in the
authors' training script). The shift uses the five-offset cross pattern of the authors' hardware.
The paper's abstract puts it at 42× fewer parameters than VGG-16 (≈ 3.3 M) and 48× fewer
operations; our count at the defaults is printed by the benchmark, not claimed to match exactly
(the first unit's split follows plain ShuffleNet V2 here).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .shift import Shift


def _conv_bn(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


def rotate_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The shift-based channel shuffle: the last quarter of the ``channels`` moves to the front.
    (``channels`` is passed, not read from ``x``, so traced graphs hold constant slices.)"""
    q = channels * 3 // 4
    parts = torch.split(x, [q, channels - q], dim=1)  # indexed: torch.fx cannot unpack a split
    return torch.cat([parts[1], parts[0]], dim=1)


class DiracDeltaUnit(nn.Module):
    """A ShuffleNet V2 unit with shifts: without ``downsample``, half the channels pass through and
    the other half go 1 × 1 → shift → 1 × 1; with it, both branches see the whole input, pool by 2
    (the shortcut 2 × 2 pool → 1 × 1; the main branch 1 × 1 → pool → shift → 1 × 1). The two halves
    are concatenated and the channels rotated by a quarter."""

    def __init__(self, cin: int, cout: int, downsample: bool, expansion: float = 2.0):
        super().__init__()
        if cout % 4:
            raise ValueError(f"DiracDeltaNet unit channels must be a multiple of 4, got {cout}")
        half = cout // 2
        mid = int(half * expansion)
        self.downsample, self.cin, self.cout = downsample, cin, cout
        branch_in = cin if downsample else cin // 2
        if not downsample and cin != cout:
            raise ValueError("a unit that keeps the resolution must keep the channels")
        self.conv1 = nn.Sequential(*_conv_bn(branch_in, mid))
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.shift = Shift(mid, 3, "cross")
        self.conv2 = nn.Sequential(*_conv_bn(mid, half))
        self.shortcut = (
            nn.Sequential(nn.MaxPool2d(2), *_conv_bn(cin, half)) if downsample else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            keep, branch = self.shortcut(x), x
        else:
            parts = torch.split(x, [self.cin // 2, self.cin - self.cin // 2], dim=1)
            keep, branch = parts[0], parts[1]
        out = self.conv2(self.shift(self.pool(self.conv1(branch))))
        return rotate_channels(torch.cat([keep, out], dim=1), self.cout)


class DiracDeltaNet(nn.Module):
    """Stem (1 × 1 convs, 2 × 2 pools, shifts), three stages of :class:`DiracDeltaUnit`, 1 × 1 conv
    to ``final`` channels, global average pooling, linear."""

    def __init__(
        self,
        classes: int = 1000,
        in_channels: int = 3,
        channels: tuple[int, int, int] = (116, 232, 464),
        blocks: tuple[int, int, int] = (4, 8, 4),
        expansion: float = 2.0,
        final: int = 1024,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn(in_channels, 32),
            nn.MaxPool2d(2),
            Shift(32, 3, "cross"),
            *_conv_bn(32, 64),
            nn.MaxPool2d(2),
            Shift(64, 3, "cross"),
        )
        units, cin = [], 64
        for c, n in zip(channels, blocks, strict=True):
            for b in range(n):
                units.append(DiracDeltaUnit(cin, c, downsample=b == 0, expansion=expansion))
                cin = c
        self.stages = nn.Sequential(*units)
        self.head = nn.Sequential(*_conv_bn(cin, final))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(final, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(
    "diracdeltanet",
    data="imagenet-like 3x224x224 images",
    input_shape=(3, 224, 224),
    description="DiracDeltaNet: ShuffleNet V2 with 1x1 convs, shifts and 2x2 pools (~3M params)",
)
def diracdeltanet(
    classes: int = 1000, in_channels: int = 3, width: float = 1.0, expansion: float = 2.0
) -> nn.Module:
    """DiracDeltaNet; ``width`` scales the stage channels (rounded to multiples of 4)."""
    channels = tuple(max(4, 4 * round(c * width / 4)) for c in (116, 232, 464))
    return DiracDeltaNet(classes, in_channels, channels, expansion=expansion)
