"""Small nets for the built-in data sets: fast to train on a CPU, with BatchNorm (ZeroQ needs it) and,
in the residual net, skip connections (integer residual adds need them)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import register_model


def _named(*parts: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(parts))


def _conv_bn(i: int, conv: type[nn.Module], cin: int, cout: int, k: int, stride: int = 1):
    """(conv{i}, bn{i}, relu{i}) as named parts, so layer FQNs read "conv1", "bn1", ..."""
    bn = nn.BatchNorm2d if conv is nn.Conv2d else nn.BatchNorm1d
    return [
        (f"conv{i}", conv(cin, cout, k, stride=stride, padding=k // 2, bias=False)),
        (f"bn{i}", bn(cout)),
        (f"relu{i}", nn.ReLU()),
    ]


@register_model(
    "digits_cnn",
    data="digits",
    input_shape=(1, 8, 8),
    description="3 conv-BN-ReLU + 2 FC layers for 8x8 digits (~73k params)",
)
def digits_cnn(width: int = 32, classes: int = 10) -> nn.Module:
    w = width
    return _named(
        *_conv_bn(1, nn.Conv2d, 1, w, 3),
        *_conv_bn(2, nn.Conv2d, w, 2 * w, 3),
        ("pool2", nn.MaxPool2d(2)),  # 4x4
        *_conv_bn(3, nn.Conv2d, 2 * w, 2 * w, 3),
        ("pool3", nn.MaxPool2d(2)),  # 2x2
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(2 * w * 4, 2 * w)),
        ("relu_fc1", nn.ReLU()),
        ("fc2", nn.Linear(2 * w, classes)),
    )


@register_model(
    "mnist1d_cnn",
    data="mnist1d",
    input_shape=(1, 40),
    description="3 conv1d-BN-ReLU + 2 FC layers for MNIST-1D (~65k params)",
)
def mnist1d_cnn(width: int = 32, classes: int = 10) -> nn.Module:
    w = width
    return _named(
        *_conv_bn(1, nn.Conv1d, 1, w, 5),
        *_conv_bn(2, nn.Conv1d, w, 2 * w, 5, stride=2),  # 20
        *_conv_bn(3, nn.Conv1d, 2 * w, 2 * w, 3, stride=2),  # 10
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(2 * w * 10, 2 * w)),
        ("relu_fc1", nn.ReLU()),
        ("fc2", nn.Linear(2 * w, classes)),
    )


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv-BN when the shape changes), then ReLU.
    ``dim`` is 2 for images, 1 for sequences."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dim: int = 2):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.relu = nn.ReLU()
        self.shortcut = (
            nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet: stem, stages of BasicBlocks (the first block of every stage but
    the first halves the resolution), global average pool, FC. ``dim`` is 2 for images, 1 for
    sequences."""

    def __init__(
        self, in_ch: int, widths: tuple[int, ...], blocks: int, classes: int, dim: int = 2
    ):
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"dim must be 1 or 2, got {dim}")
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.stem = nn.Sequential(
            conv(in_ch, widths[0], 3, 1, 1, bias=False), bn(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1, dim=dim))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if dim == 2 else nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@register_model(
    "digits_resnet",
    data="digits",
    input_shape=(1, 8, 8),
    description="ResNet with 2 stages of 1 BasicBlock for 8x8 digits (~77k params)",
)
def digits_resnet(width: int = 32, classes: int = 10) -> nn.Module:
    return ResNet(1, (width, 2 * width), 1, classes)


@register_model(
    "digits_resnet_deep",
    data="digits",
    input_shape=(1, 8, 8),
    description="ResNet with 3 stages of 3 BasicBlocks for 8x8 digits (20 convs, ~0.3M params)",
)
def digits_resnet_deep(width: int = 16, blocks: int = 3, classes: int = 10) -> nn.Module:
    return ResNet(1, (width, 2 * width, 4 * width), blocks, classes)


@register_model(
    "mnist1d_resnet",
    data="mnist1d",
    input_shape=(1, 40),
    description="1-D ResNet with 3 stages of 3 BasicBlocks for MNIST-1D (20 convs, ~0.1M params)",
)
def mnist1d_resnet(width: int = 16, blocks: int = 3, classes: int = 10) -> nn.Module:
    return ResNet(1, (width, 2 * width, 4 * width), blocks, classes, dim=1)


@register_model(
    "resnet_cifar",
    data="cifar-like 3x32x32 images",
    input_shape=(3, 32, 32),
    description="ResNet-14-style net, 3 stages x 2 blocks, ~1.1M params (benchmarks)",
)
def resnet_cifar(width: int = 40, classes: int = 10) -> nn.Module:
    return ResNet(3, (width, 2 * width, 4 * width), 2, classes)


class TokenTransformer(nn.Module):
    """Rows of an image as tokens: a linear embedding, a learned position table, a stack of
    PyTorch's own ``nn.TransformerEncoderLayer`` (so ``nn.MultiheadAttention``, which squeezer
    splits into four Linears), mean pooling and a linear head."""

    def __init__(self, rows: int, cols: int, d: int, heads: int, layers: int, classes: int):
        super().__init__()
        self.rows, self.cols = rows, cols
        self.embed = nn.Linear(cols, d)
        self.pos = nn.Parameter(torch.zeros(1, rows, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(-1, self.rows, self.cols)) + self.pos
        return self.head(self.encoder(h).mean(1))


@register_model(
    "digits_transformer",
    data="digits",
    input_shape=(1, 8, 8),
    description="2 nn.TransformerEncoderLayer blocks over the 8 rows of a digit (~18k params)",
)
def digits_transformer(
    d: int = 32, heads: int = 4, layers: int = 2, classes: int = 10
) -> nn.Module:
    return TokenTransformer(8, 8, d, heads, layers, classes)
