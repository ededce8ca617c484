"""SqueezeNet 1.0 and 1.1 (Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer
parameters and <0.5MB model size", arXiv:1602.07360).

The fire module squeezes the channels with 1 × 1 filters, then expands them with 1 × 1 and 3 × 3
filters side by side, their outputs concatenated (Sec. 3.2). SqueezeNet 1.0 is the paper's
Table 1: a 7 × 7 stem of 96 filters, eight fire modules with max pooling after the stem, fire4 and
fire8; SqueezeNet 1.1 (the authors' release notes) takes a 3 × 3 stem of 64 and pools earlier, for
2.4× less computation at the same accuracy. Both end with dropout, a 1 × 1 convolution to the
classes, ReLU and global average pooling: no fully connected layer.

Reference figures at 1000 classes and 224 × 224: 1,248,424 and 1,235,496 parameters (torchvision's
``squeezenet1_0``/``squeezenet1_1``, which follow the same definition), 0.82 and 0.35 GMACs
(torchvision's model table; it calls them GFLOPS).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Reference, register_model

PAPER = "SqueezeNet, arXiv:1602.07360"


class Fire(nn.Module):
    """squeeze (1 × 1, ReLU) → [expand 1 × 1, expand 3 × 3] (each ReLU) → concatenated channels."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_relu = nn.ReLU()
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_relu = nn.ReLU()
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_relu = nn.ReLU()
        self.out_channels = expand1x1 + expand3x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze_relu(self.squeeze(x))
        a = self.expand1x1_relu(self.expand1x1(s))
        b = self.expand3x3_relu(self.expand3x3(s))
        return torch.cat([a, b], dim=1)


#: (squeeze, expand) of each fire module (both expands equal), and where max pooling sits:
#: "M" is a 3 × 3 / 2 max pool (ceil mode, as the original Caffe model rounds).
_LAYOUT = {
    "1_0": (96, 7, ["M", (16, 64), (16, 64), (32, 128), "M", (32, 128), (48, 192), (48, 192),
                    (64, 256), "M", (64, 256)]),
    "1_1": (64, 3, ["M", (16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192),
                    (48, 192), (64, 256), (64, 256)]),
}  # fmt: skip


class SqueezeNet(nn.Module):
    """SqueezeNet ``version`` "1_0" or "1_1": ``features`` (stem, fire modules, pooling) and a
    classifier of dropout, 1 × 1 conv to ``classes``, ReLU and global average pooling."""

    def __init__(
        self, version: str = "1_0", classes: int = 1000, in_channels: int = 3, dropout: float = 0.5
    ):
        super().__init__()
        if version not in _LAYOUT:
            raise ValueError(
                f"SqueezeNet version must be one of {sorted(_LAYOUT)}, got {version!r}"
            )
        stem, k, layout = _LAYOUT[version]
        layers: list[tuple[str, nn.Module]] = [
            ("conv1", nn.Conv2d(in_channels, stem, k, stride=2)),
            ("relu1", nn.ReLU()),
        ]
        cin, fire, pool = stem, 2, 1
        for item in layout:
            if item == "M":
                layers.append((f"pool{pool}", nn.MaxPool2d(3, 2, ceil_mode=True)))
                pool += 1
            else:
                s, e = item
                layers.append((f"fire{fire}", Fire(cin, s, e, e)))
                cin, fire = 2 * e, fire + 1
        self.features = nn.Sequential()
        for name, m in layers:
            self.features.add_module(name, m)
        self.out_channels = cin
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Conv2d(cin, classes, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self._init(self.classifier[1])

    def _init(self, final: nn.Conv2d) -> None:
        # the paper's initialisation: Kaiming-uniform convolutions, the last one N(0, 0.01) so the
        # starting logits are small
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


TORCHVISION = "torchvision squeezenet1_0/1_1 (parameters; GMACs from its model table)"
#: version -> (parameters, GMACs) at 1000 classes and 224 x 224, and what the version changes
_REFERENCES = {
    "1_0": (1_248_424, 0.82, "7x7 stem, 8 fire modules (1.25M params at 1000 classes)"),
    "1_1": (1_235_496, 0.35, "3x3 stem, earlier pooling (1.24M params, 2.4x fewer MACs)"),
}


def _factory(version: str):
    def factory(classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> nn.Module:
        return SqueezeNet(version, classes, in_channels, dropout)

    factory.__name__ = f"squeezenet{version}"
    factory.__doc__ = f"SqueezeNet {version.replace('_', '.')}."
    return factory


for _version, (_params, _gmacs, _what) in _REFERENCES.items():
    register_model(
        f"squeezenet{_version}",
        data="imagenet-like 3x224x224 images",
        input_shape=(3, 224, 224),
        description=f"SqueezeNet {_version.replace('_', '.')}: {_what}",
        reference=Reference(
            TORCHVISION, _params, macs=round(_gmacs * 1e9), kwargs={"classes": 1000}, paper=PAPER
        ),
    )(_factory(_version))
