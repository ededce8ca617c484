"""graph: which layers are quantizable (exact types only, in model order), which weights stay in
float, channel axes, getting and replacing layers by FQN, copies that share nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.errors import ConfigError
from squeezer.graph import (
    QUANTIZABLE_TYPES,
    copy_model,
    float_weights,
    get_module,
    quantizable_layers,
    set_module,
    weight_channel_axis,
)


class MyLinear(nn.Linear):
    """A subclass: its forward may differ, so squeezer leaves it in float."""


class WithPosition(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(5, 4))
        self.fc = nn.Linear(4, 4)


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), MyLinear(4, 4), nn.GRU(4, 2),
        nn.LayerNorm(2), WithPosition(), nn.Embedding(10, 3),
    )  # fmt: skip


@pytest.mark.parametrize("kind", QUANTIZABLE_TYPES, ids=lambda k: k.__name__)
def test_every_quantizable_type_is_found_and_its_subclass_is_not(kind):
    args = {nn.Embedding: (6, 4)}.get(kind, (4, 6, 1) if "Conv" in kind.__name__ else (4, 6))
    layer = kind(*args)
    sub = type("Sub", (kind,), {})(*args)
    assert list(quantizable_layers(nn.Sequential(layer, sub))) == ["0"]
    axis = weight_channel_axis(layer)
    assert layer.weight.shape[axis] == 6  # the output channels


def test_float_weights_name_what_stays_in_float():
    fw = float_weights(net())
    assert fw["3"] == ("MyLinear", 16) and fw["4"][0] == "GRU" and fw["6.pos"] == ("Parameter", 20)
    assert "1" not in fw and "5" not in fw  # normalisation layers are not "weights left behind"
    assert list(quantizable_layers(net())) == ["0", "6.fc", "7"]


def test_get_set_and_copy():
    m = net()
    assert get_module(m, "6.fc") is m[6].fc
    with pytest.raises(ConfigError, match="no layer named"):
        get_module(m, "6.nope")
    c = copy_model(m)
    set_module(c, "6.fc", nn.Identity())
    assert isinstance(m[6].fc, nn.Linear) and isinstance(c[6].fc, nn.Identity)
    c[0].weight.data.add_(1.0)
    assert not torch.equal(c[0].weight, m[0].weight)  # no shared storage
