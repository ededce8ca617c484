"""Size and BOPs accounting on a hand-computed model."""

import torch
from torch import nn

from squeezer.config import LayerQuant, Plan
from squeezer.measure import average_bits, bops, model_bytes, profile_layers


def _net():
    # conv: 2->4 channels, 3x3, no bias, on 1x2x5x5 input with padding 1 -> 4x5x5 output
    # fc:   100 -> 3 with bias
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(100, 3))


def test_profile_macs_exact():
    prof = profile_layers(_net(), torch.zeros(7, 2, 5, 5))
    assert prof["0"].params == 72 and prof["2"].params == 300
    assert prof["0"].macs == 4 * 5 * 5 * (2 * 3 * 3)  # 1800 per sample
    assert prof["2"].macs == 300


def test_bytes_and_bops_exact():
    net = _net()
    plan = Plan(
        {
            "0": LayerQuant(bits=4, act_bits=8),
            "2": LayerQuant(bits=8, granularity="tensor", symmetric=False),
        }
    )
    # float: 72 + 300 + 3 params x 4 B
    assert model_bytes(net) == 375 * 4
    # conv: 72 codes x 4 bit = 36 B + 4 channel scales x 4 B = 16 B, + 8 B activation qparams
    # fc: 300 codes = 300 B + 1 scale (4 B) + 1 zero point (1 B); bias 3 x 4 B = 12 B
    assert model_bytes(net, plan) == 36 + 16 + 8 + 300 + 4 + 1 + 12
    prof = profile_layers(net, torch.zeros(1, 2, 5, 5))
    b = bops(prof, plan)
    assert b["0"] == 1800 * 4 * 8
    assert b["2"] == 300 * 8 * 32  # activations of fc stay float
    assert average_bits(net, plan) == (72 * 4 + 300 * 8) / 372
