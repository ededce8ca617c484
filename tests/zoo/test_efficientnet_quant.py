"""Per-channel weight quantization of EfficientNet-Lite (depthwise (C, 1, k, k) weights, dead
channels) against a hand-made oracle: ``round(w / s) · s`` with ``s = max|w| / 127`` per output
channel, written here in plain torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer import quantize
from squeezer.templates import uniform_plan
from squeezer.zoo import create

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_w8(net: nn.Module) -> nn.Module:
    out = copy.deepcopy(net)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                s = (w.abs().flatten(1).amax(1).clamp_min(1e-30) / 127).view(-1, *[1] * (w.dim() - 1))
                w.copy_(torch.round(w / s).clamp(-127, 127) * s)
    return out


def test_w8_per_channel_equals_the_hand_made_copy_with_dead_channels():
    g = torch.Generator().manual_seed(0)
    net = create("efficientnet_lite0", image_size=64, classes=10).eval()
    with torch.no_grad():  # dead channels as the ImageNet weights have them
        net.stem.conv.weight[11] = 4e-8 * torch.randn(3, 3, 3, generator=g)
        net.blocks[0].depthwise.conv.weight[16] = 0.0
    before = copy.deepcopy(net.state_dict())
    q = quantize(net, uniform_plan(net, 8, act_bits=None))
    hand = _hand_w8(net)
    x = torch.randn(4, 3, 64, 64, generator=g)
    with torch.no_grad():
        yq, yh = q(x), hand(x)
    assert q.training is False
    assert torch.allclose(yq, yh, rtol=1e-5, atol=1e-5 * float(yh.abs().max()))
    # the depthwise weights (C, 1, 3, 3) are scaled per output channel, not per tensor
    wq = q.blocks[1].depthwise.conv
    assert wq.weight_quantizer.scale.numel() == wq.weight.shape[0] == 96
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
