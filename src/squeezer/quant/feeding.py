"""Running calibration inputs through a model: what activation-range calibration
(:func:`squeezer.quant.apply.calibrate`) and bias correction
(:func:`squeezer.quant.bias_correction.correct_bias`) both do."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..data import forward, to_device
from ..graph import model_device


@torch.no_grad()
def feed(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None) -> int:
    """Run the inputs of ``batches`` (``(inputs, targets)`` pairs or bare inputs) through
    ``model`` on its device, at most ``max_batches`` of them; returns how many ran."""
    device = model_device(model)
    n = 0
    for batch in batches:
        inputs = batch[0] if isinstance(batch, tuple | list) else batch
        forward(model, to_device(inputs, device))
        n += 1
        if max_batches is not None and n >= max_batches:
            break
    return n
