"""Published figures of the zoo's architectures and how to count ours the same way.

A parameter count is unambiguous; a MAC count is not. :func:`squeezer.measure.profile_layers`
counts the multiply-accumulates of convolutions and linear layers, which is what torchvision's
model table reports (it calls them GFLOPS). pytorchcv's table (the source of the SqueezeNext
figures) reports half of its "FLOPs", which also charge BatchNorm (4 per element), ReLU (1),
pooling (1 per window element) and every bias (1): :func:`count_macs` reproduces either convention,
so each reference is checked in its own units.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    >>> count_macs(net, (1, 5, 5)), count_macs(net, (1, 5, 5), "pytorchcv")
    (162, 207.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

#: MAC conventions: conv/linear multiply-accumulates only (squeezer, torchvision), or pytorchcv's.
COUNTINGS = ("macs", "pytorchcv")


@dataclass(frozen=True)
class Reference:
    """Published figures of an architecture, for tests and benchmarks to check against.

    Attributes:
        source: where the figures come from (paper, table, library).
        params: parameter count of ``create(name, **kwargs)``.
        params_tol: allowed |ours − params|: 0 for an exact count; half the last published digit
            when the source rounds (0.03M → 5,000).
        macs: multiply-accumulates per sample at the entry's ``input_shape``, in the ``counting``
            convention, or None if not published.
        macs_rtol: allowed relative difference of the MACs.
        counting: "macs" (conv and linear MACs, as :func:`squeezer.measure.profile_layers`) or
            "pytorchcv" (see :func:`count_macs`).
        kwargs: the factory arguments the figures are for (e.g. ``classes=1000``).
        paper: the paper the architecture comes from.

    Example:
        >>> Reference(source="torchvision", params=1_248_424, kwargs={"classes": 1000}).params_tol
        0
    """

    source: str
    params: int | None = None
    params_tol: int = 0
    macs: int | None = None
    macs_rtol: float = 0.02
    counting: str = "macs"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""

    def __post_init__(self) -> None:
        if self.counting not in COUNTINGS:
            raise ValueError(f"counting must be one of {COUNTINGS}, got {self.counting!r}")
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...], counting: str = "macs") -> float:
    """MACs per sample of ``model`` on a zero input of ``input_shape``, in ``counting``'s convention.

    "macs" sums :func:`squeezer.measure.profile_layers` (conv and linear multiply-accumulates).
    "pytorchcv" is half of pytorchcv's FLOPs: 2 per MAC of a conv or linear layer with a bias (one
    fewer per output channel and input channel without), 4 per BatchNorm element, 1 per ReLU
    element, 1 per pooling window element.
    """
    if counting == "macs":
        from ..measure import profile_layers

        return sum(p.macs for p in profile_layers(model, torch.zeros(1, *input_shape)).values())
    if counting != "pytorchcv":
        raise ValueError(f"counting must be one of {COUNTINGS}, got {counting!r}")
    return sum(pytorchcv_breakdown(model, input_shape).values())


@torch.no_grad()
def pytorchcv_breakdown(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """pytorchcv's "FLOPs/2" of ``model``, split by what charges it: "conv_linear" (equal to the
    conv and linear MACs when every conv has a bias; one half-FLOP fewer per input and output
    channel pair without), "batchnorm" (2 per element), "relu" (0.5 per element), "pooling" (0.5
    per window element). pytorchcv's ``measure_model`` also returns a MAC count of conv and
    linear layers alone, which is what ``count_macs(..., "macs")`` gives.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
        >>> pytorchcv_breakdown(net, (1, 5, 5))
        {'conv_linear': 162.0, 'batchnorm': 36.0, 'relu': 9.0, 'pooling': 0.0}
    """
    flops = dict.fromkeys(("conv_linear", "batchnorm", "relu", "pooling"), 0.0)

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = inp[0]
        if isinstance(mod, nn.Conv2d):
            k = math.prod(mod.kernel_size)
            if mod.bias is not None:
                flops["conv_linear"] += 2 * out.numel() * k * mod.in_channels // mod.groups
            else:
                hw = out.shape[2] * out.shape[3]
                flops["conv_linear"] += (
                    (2 * k * hw - 1) * mod.in_channels * mod.out_channels // mod.groups
                )
        elif isinstance(mod, nn.Linear):
            flops["conv_linear"] += (2 * mod.in_features - (mod.bias is None)) * mod.out_features
        elif isinstance(mod, nn.BatchNorm2d):
            flops["batchnorm"] += 4 * x.numel()
        elif isinstance(mod, nn.ReLU):
            flops["relu"] += x.numel()
        elif isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
            k = mod.kernel_size
            flops["pooling"] += out.numel() * (math.prod(k) if isinstance(k, tuple) else k * k)
        elif isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
            flops["pooling"] += out.numel() * x.shape[2] * x.shape[3]

    x = torch.zeros(1, *input_shape)
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v / 2 for k, v in flops.items()}
