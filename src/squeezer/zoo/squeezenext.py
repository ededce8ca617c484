"""SqueezeNext (Gholami et al., "SqueezeNext: Hardware-Aware Neural Network Design", CVPR-W 2018,
arXiv:1803.10615).

Each block squeezes its input with two 1 × 1 convolutions (to 1/2, then 1/4 of the channels),
applies a separable 3 × 1 then 1 × 3 convolution (back to 1/2) and expands with a 1 × 1
convolution, every convolution followed by BatchNorm and ReLU, and adds a shortcut (a 1 × 1
convolution where the shape changes). A 7 × 7 / 2 stem and a 3 × 3 / 2 max pool lead into four
stages at 32, 64, 128 and 256 channels (× the width multiplier); the first block of stages 2–4
strides by two and skips the first squeeze. A 1 × 1 convolution to 128 channels, global average
pooling and a linear classifier end the network.

``1.0-SqNxt-23`` has 6, 6, 8 and 1 blocks per stage; ``23v5``, the paper's hardware-tuned variant,
moves blocks from the early stages to the third: 2, 4, 14, 1. The width multiplier (1.0, 1.5, 2.0 in
the paper) scales every channel count.

Reference figures at 1000 classes and 224 × 224 (pytorchcv's model table): 724,056 parameters for
1.0-SqNxt-23 and 921,816 for 1.0-SqNxt-23v5 (the convolutions there carry a bias next to their
BatchNorm, which this definition keeps so the counts agree), and 287.28 M and 285.82 M "MACs" in
pytorchcv's convention, which also charges BatchNorm, ReLU and pooling
(:func:`squeezer.zoo.reference.count_macs`). Conv and linear multiply-accumulates alone are
275.9 M and 276.9 M. The Caffe release takes 227 × 227 crops through an unpadded stem (the same
55 × 55 map after pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Reference, register_model

PAPER = "SqueezeNext, arXiv:1803.10615"
BLOCKS = {"23": (6, 6, 8, 1), "23v5": (2, 4, 14, 1)}


def _conv_bn_relu(cin: int, cout: int, kernel, stride: int = 1, padding=0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=True), nn.BatchNorm2d(cout), nn.ReLU()
    )


class SqnxtBlock(nn.Module):
    """1 × 1 squeeze, 1 × 1 squeeze, 3 × 1, 1 × 3, 1 × 1 expand (each conv-BN-ReLU) + shortcut,
    ReLU. A block that strides keeps all input channels in its first 1 × 1 (reduction 1); one
    that narrows the channels squeezes by 4; the others by 2."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        if stride == 2:
            r, project = 1, True
        elif cin > cout:
            r, project = 4, True
        else:
            r, project = 2, cin != cout
        half, quarter = cin // r, cin // (2 * r)
        self.conv1 = _conv_bn_relu(cin, half, 1, stride)
        self.conv2 = _conv_bn_relu(half, quarter, 1)
        self.conv3 = _conv_bn_relu(quarter, half, (3, 1), padding=(1, 0))
        self.conv4 = _conv_bn_relu(half, half, (1, 3), padding=(0, 1))
        self.conv5 = _conv_bn_relu(half, cout, 1)
        self.shortcut = _conv_bn_relu(cin, cout, 1, stride) if project else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class SqueezeNext(nn.Module):
    """``width``-SqNxt-``version``: stem (7 × 7 / 2 conv, 3 × 3 / 2 max pool), four stages of
    :class:`SqnxtBlock`, a 1 × 1 conv to 128·width, global average pooling, linear.
    ``features(x)`` is everything before the pooling (the detection trunk)."""

    def __init__(
        self, version: str = "23", width: float = 1.0, classes: int = 1000, in_channels: int = 3
    ):
        super().__init__()
        if version not in BLOCKS:
            raise ValueError(
                f"SqueezeNext version must be one of {sorted(BLOCKS)}, got {version!r}"
            )
        stem = int(64 * width)
        self.stem = nn.Sequential(
            _conv_bn_relu(in_channels, stem, 7, 2, 1), nn.MaxPool2d(3, 2, ceil_mode=True)
        )
        stages, cin = [], stem
        for i, (n, c) in enumerate(zip(BLOCKS[version], (32, 64, 128, 256), strict=True)):
            cout = int(c * width)
            blocks = []
            for b in range(n):
                blocks.append(SqnxtBlock(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = _conv_bn_relu(cin, int(128 * width), 1)
        self.out_channels = int(128 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.out_channels, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _factory(version: str, width: float):
    def factory(classes: int = 1000, in_channels: int = 3, width: float = width) -> nn.Module:
        return SqueezeNext(version, width, classes, in_channels)

    factory.__name__ = f"sqnxt{version}"
    factory.__doc__ = f"{width}-SqNxt-{version} (``width`` is the width multiplier)."
    return factory


PYTORCHCV = "pytorchcv model table (parameters; MACs in its convention, counting='pytorchcv')"

#: version -> (parameters, MACs in pytorchcv's convention) at width 1.0, 1000 classes, 224 x 224
_REFERENCES = {"23": (724_056, 287_280_000), "23v5": (921_816, 285_820_000)}

for _version, (_params, _macs) in _REFERENCES.items():
    register_model(
        f"sqnxt{_version}",
        data="imagenet-like 3x224x224 images",
        input_shape=(3, 224, 224),
        description=f"1.0-SqNxt-{_version}, blocks {'-'.join(map(str, BLOCKS[_version]))} "
        f"({_params / 1e6:.2f}M params at 1000 classes; width= multiplies the channels)",
        reference=Reference(
            PYTORCHCV,
            _params,
            macs=_macs,
            counting="pytorchcv",
            kwargs={"classes": 1000},
            paper=PAPER,
        ),
    )(_factory(_version, 1.0))
