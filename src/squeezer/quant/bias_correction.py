"""Bias correction: the mean output error quantization causes, subtracted from each layer's bias.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction"
(arXiv:1906.04721, section 4.2). Rounding a layer's weights W to Q(W) adds the error ε = Q(W) − W,
and its output y = W·x + b moves by ε·x. The error of each weight is small and unbiased, but an
output channel sums hundreds of them against inputs that are mostly positive (after a ReLU), so
E[ε·x] per output channel is not zero: a systematic shift of that channel, which BatchNorm-free
deployment, the ReLUs after it and every later layer see as a wrong bias. Subtracting that shift
from the bias removes it at no cost at inference: the corrected bias is just the layer's bias.

Here the shift is measured on calibration inputs (the paper's empirical variant) and includes the
input quantizer: for each quantized layer, c = E[Q(W)·Q(x) − W·x] over the batch and every
spatial or token position, per output channel, with x the layer's input in the *float* model.
All layers are measured in one pass over the float model (each layer's output is passed on in
float), so, as the activation ranges of :func:`squeezer.quant.apply.calibrate`, the corrections do
not depend on the order of the layers. A layer without a bias gets one (zeros minus c).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..attention import SplitAttention
from ..errors import ConfigError
from .feeding import feed
from .modules import QuantEmbedding, QuantMixin


def _correctable(qmodel: nn.Module) -> dict[str, nn.Module]:
    """The layers whose output a bias shifts: every quantized layer but embedding tables."""
    return {
        fqn: m
        for fqn, m in qmodel.named_modules()
        if isinstance(m, QuantMixin) and not isinstance(m, QuantEmbedding)
    }


def _channel_dim(layer: nn.Module) -> int:
    """The output's channel dimension: last for Linear, 1 for (transposed) convolutions."""
    return -1 if isinstance(layer, nn.Linear) else 1


@torch.no_grad()
def correct_bias(
    qmodel: nn.Module, calib: Iterable[Any], *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Subtract each quantized layer's mean output error on ``calib`` from its bias, in place.

    ``qmodel`` must be a model :func:`squeezer.quantize` returned, its activation quantizers
    calibrated (``quantize(..., bias_correction=True)`` calls this after calibrating). Layers
    without a bias get one. Returns the correction subtracted from each layer, by FQN.

    Args:
        qmodel: the quantized model (changed in place).
        calib: batches: ``(inputs, targets)`` pairs or bare inputs.
        max_batches: stop after this many batches.

    Example:
        >>> from squeezer.config import LayerQuant, QuantConfig
        >>> from squeezer.quant.apply import quantize
        >>> net = nn.Sequential(nn.Linear(8, 4, bias=False))
        >>> q = quantize(net, QuantConfig(LayerQuant(bits=2, act_bits=None)))
        >>> c = correct_bias(q, [torch.rand(64, 8)])
        >>> q[0].bias.shape, float((q[0].bias + c["0"]).abs().max())
        (torch.Size([4]), 0.0)
    """
    layers = _correctable(qmodel)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)

    def hook(fqn: str):
        def fn(module: nn.Module, args: tuple, y_q: torch.Tensor) -> torch.Tensor:
            y_f = _float_output(module, args)
            dim = _channel_dim(module)
            diff = (y_q - y_f).double().movedim(dim, -1)
            diff = diff.reshape(-1, diff.shape[-1])
            sums[fqn] = sums.get(fqn, 0) + diff.sum(0)
            counts[fqn] += diff.shape[0]
            return y_f  # later layers see the float model's activations

        return fn

    was_training = qmodel.training
    qmodel.eval()
    handles = [m.register_forward_hook(hook(fqn)) for fqn, m in layers.items()]
    n = 0
    try:
        n = feed(qmodel, calib, max_batches=max_batches)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    if n == 0:
        raise ConfigError("bias correction got no calibration batches; pass at least one batch")
    corrections = {}
    for fqn, m in layers.items():
        if fqn not in sums:  # the layer did not run on these inputs
            continue
        c = (sums[fqn] / counts[fqn]).to(m.weight.dtype)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(c), requires_grad=m.weight.requires_grad)
        m.bias.sub_(c)
        corrections[fqn] = c
    return corrections


def _float_output(module: nn.Module, args: tuple) -> torch.Tensor:
    """``module``'s output on ``args`` with its weight and input in float."""
    wq, iq = module.weight_quantizer, module.input_quantizer
    wq.enabled = False
    module.input_quantizer = None
    try:
        return module.forward(*args)
    finally:
        wq.enabled = True
        module.input_quantizer = iq


def add_saved_biases(qmodel: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Give each quantized layer without a bias the (zero) bias parameter ``state_dict`` holds
    for it: the one bias correction added, so the saved model loads into its structure."""
    for fqn, m in _correctable(qmodel).items():
        key = f"{fqn}.bias" if fqn else "bias"
        if m.bias is None and key in state_dict:
            m.bias = nn.Parameter(
                torch.zeros_like(state_dict[key], dtype=m.weight.dtype),
                requires_grad=m.weight.requires_grad,
            )


def default_bias_correction(model: nn.Module) -> bool:
    """Whether runs correct biases unless told: for conv nets (the model has a convolution).

    Measured (docs/benchmarks.md, "W8A8 with bias correction"): on EfficientNet-Lite0 it raises
    W8A8 agreement with FP32, and it does not hurt the digits and MNIST-1D nets; models without
    convolutions (MLPs, encoders, whose token positions include padding) keep their biases, and
    so do vision transformers, whose one convolution is the patch embedding (LayerNorm or
    attention marks them: the correction moved a tiny ViT's ONNX export 2 output steps from the
    simulation, where 0.5 is the rule).
    """
    conv = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
    transformer = (nn.LayerNorm, nn.MultiheadAttention, SplitAttention)
    mods = list(model.modules())
    return any(isinstance(m, conv) for m in mods) and not any(
        isinstance(m, transformer) for m in mods
    )
