"""BatchNorm layers made non-trivial for the integer tests: random affine parameters (some γ
negative) and running statistics of a given batch."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm affine parameters, some γ negative (exercises sign folding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return net


def bn_stats(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics of ``x`` (one train-mode pass with a cumulative average), then eval."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()
