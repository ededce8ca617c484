"""ShiftResNet for 32 × 32 images (Wu et al., "Shift: A Zero FLOP, Zero Parameter Alternative to
Spatial Convolutions", CVPR 2018, arXiv:1711.08141, Sec. 5.1 and its CIFAR table), and the CIFAR
ResNet it is compared with (He et al., arXiv:1512.03385, Sec. 4.2).

The CIFAR ResNet-(6n+2): a 3 × 3 stem of 16 channels, three stages of n residual blocks at 16, 32 and
64 channels (the first block of stages 2 and 3 halves the resolution), global average pooling and
a linear classifier. ShiftResNet replaces each block's two 3 × 3 convolutions by one
conv-shift-conv (CSC) module: a 1 × 1 convolution expanding to ``expansion`` × the block's output
channels, BatchNorm and ReLU, a 3 × 3 :class:`~squeezer.zoo.shift.Shift`, a 1 × 1 convolution back
(carrying the block's stride) and BatchNorm, added to the shortcut. The expansion rate ε trades
accuracy for size: the paper's table lists ε = 1, 3, 6, 9 ("c, 3c, 6c, 9c"); at ε = 9 the CSC
module has as many weights as the two 3 × 3 convolutions it replaces.

Reference parameter counts are the paper's CIFAR-10 table (millions, two decimals; the authors'
repository, alvinwan/shiftresnet-cifar, lists the same table): ShiftResNet-20 0.03 / 0.10 / 0.19 /
0.28 M at ε = 1 / 3 / 6 / 9, ShiftResNet-56 0.10 / 0.29 / 0.58 / 0.87 M; ResNet-20 0.27 M and
ResNet-56 0.86 M.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Reference, register_model
from .shift import Shift

PAPER = "Shift, arXiv:1711.08141"
TABLE = "Shift paper (arXiv:1711.08141), CIFAR-10 table; millions to two decimals"
EXPANSIONS = (1, 3, 6, 9)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class CSCBlock(nn.Module):
    """Conv-shift-conv residual block: 1 × 1 expand, BN, ReLU, shift, 1 × 1 (stride), BN, + shortcut,
    ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: float = 1):
        super().__init__()
        mid = int(cout * expansion)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shift = Shift(mid, 3)
        self.conv2 = nn.Conv2d(mid, cout, 1, stride, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shift(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class BasicBlock(nn.Module):
    """Two 3 × 3 conv-BN (ReLU between) plus a 1 × 1 projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, three stages of ``blocks`` blocks (16, 32, 64 channels × ``width``), pool, linear.
    ``expansion`` None builds BasicBlocks (ResNet), a number builds CSC blocks (ShiftResNet)."""

    def __init__(
        self,
        blocks: int,
        expansion: float | None = None,
        classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
    ):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for i, w in enumerate(widths):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                if expansion is None:
                    layers.append(BasicBlock(cin, w, stride))
                else:
                    layers.append(CSCBlock(cin, w, stride, expansion))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


_SHIFT_PARAMS = {20: (0.03, 0.10, 0.19, 0.28), 56: (0.10, 0.29, 0.58, 0.87)}
_RESNET_PARAMS = {20: 0.27, 56: 0.86}


def _ref(millions: float, **kwargs) -> Reference:
    # the table rounds to 0.01 M: anything within half of that matches it
    return Reference(TABLE, round(millions * 1e6), 5_000, kwargs=kwargs, paper=PAPER)


def _shiftresnet_factory(depth: int, eps: int):
    n = (depth - 2) // 6

    def factory(classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(n, eps, classes, in_channels)

    factory.__name__ = f"shiftresnet{depth}_e{eps}"
    factory.__doc__ = f"ShiftResNet-{depth} with expansion rate {eps} for 32x32 images."
    return factory


def _register_shiftresnet(depth: int) -> None:
    for eps, ref in zip(EXPANSIONS, _SHIFT_PARAMS[depth], strict=True):
        register_model(
            f"shiftresnet{depth}_e{eps}",
            data="cifar-like 3x32x32 images",
            input_shape=(3, 32, 32),
            description=f"ShiftResNet-{depth}, CSC blocks at expansion {eps}c (~{ref}M params)",
            reference=_ref(ref, classes=10),
        )(_shiftresnet_factory(depth, eps))


def _register_resnet(depth: int) -> None:
    n = (depth - 2) // 6

    def factory(classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(n, None, classes, in_channels)

    factory.__name__ = f"resnet{depth}_cifar"
    factory.__doc__ = f"The CIFAR ResNet-{depth} of He et al. (the Shift paper's baseline)."
    register_model(
        f"resnet{depth}_cifar",
        data="cifar-like 3x32x32 images",
        input_shape=(3, 32, 32),
        description=f"CIFAR ResNet-{depth} (3x{n} BasicBlocks), the Shift paper's baseline",
        reference=_ref(_RESNET_PARAMS[depth], classes=10),
    )(factory)


for _depth in (20, 56):
    _register_shiftresnet(_depth)
    _register_resnet(_depth)
