"""Learnable quantizer step sizes (LSQ; Esser et al., "Learned Step Size Quantization",
arXiv:1902.08153), switched on for the length of a fine-tuning run and off again after it.

:func:`learn_scales` turns every :class:`~squeezer.quant.modules.WeightQuantizer` and
:class:`~squeezer.quant.modules.ActQuantizer` of a model into a learnable one: the scale buffer
stays, and beside it a parameter ``log_scale`` is what the optimizer moves (``scale = exp(log_scale)``,
so a step size can never turn negative, and Adam's steps are relative changes of the scale, whatever
its magnitude). The gradient reaching ``log_scale`` is LSQ's: through :func:`fake_quantize`'s
straight-through rounding, ``∂ŵ/∂s = round(w/s) − w/s`` inside the clip range and ``qmin``/``qmax``
outside it. Zero points stay fixed.

:func:`fix_scales` writes the learned scales back into the buffers and removes the parameters, so
the model is again a plain squeezer-quantized model: same state-dict keys, exported, stored and run
integer-only exactly as a post-training-quantized one.

Example:
    >>> from squeezer.config import LayerQuant, QuantConfig
    >>> from squeezer.quant.apply import quantize
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(4, 2)), QuantConfig(LayerQuant(bits=4)))
    >>> [n for n, _ in learn_scales(q)]
    ['0.weight_quantizer.log_scale']
    >>> fix_scales(q); [n for n, _ in q.named_parameters()]
    ['0.weight', '0.bias']
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.modules import ActQuantizer, WeightQuantizer
from ..quant.primitives import QParams, qrange


class _Learnable:
    """Mixed into a quantizer's class while its scale is learned: ``qparams`` reads the parameter."""

    log_scale: nn.Parameter

    def qparams(self) -> QParams:
        bits = self.spec.bits if isinstance(self, WeightQuantizer) else self.bits
        symmetric = self.spec.symmetric if isinstance(self, WeightQuantizer) else self.symmetric
        qmin, qmax = qrange(bits, symmetric)
        return QParams(self.log_scale.exp(), self.zero_point, qmin, qmax)


class LearnableWeightQuantizer(_Learnable, WeightQuantizer):
    """A :class:`WeightQuantizer` whose scale is the parameter ``exp(log_scale)``."""


class LearnableActQuantizer(_Learnable, ActQuantizer):
    """An :class:`ActQuantizer` whose scale is the parameter ``exp(log_scale)``."""


_LEARNABLE = {WeightQuantizer: LearnableWeightQuantizer, ActQuantizer: LearnableActQuantizer}


def learn_scales(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Make every quantizer of ``model`` learn its scale (in place); returns the new parameters
    by name. Calibrated quantizers only: an activation quantizer must have been calibrated."""
    out = []
    for name, m in model.named_modules():
        cls = _LEARNABLE.get(type(m))
        if cls is None:
            continue
        with torch.no_grad():
            log_scale = nn.Parameter(m.scale.detach().clamp_min(1e-12).log().clone())
        m.__class__ = cls
        m.register_parameter("log_scale", log_scale)
        out.append((f"{name}.log_scale" if name else "log_scale", log_scale))
    return out


@torch.no_grad()
def fix_scales(model: nn.Module) -> None:
    """Undo :func:`learn_scales` (in place): each learned scale goes into the ``scale`` buffer."""
    back = {v: k for k, v in _LEARNABLE.items()}
    for m in model.modules():
        if type(m) in back:
            m.scale = m.log_scale.detach().exp().to(m.scale.dtype).reshape(m.scale.shape).clone()
            del m._parameters["log_scale"]
            m.__class__ = back[type(m)]


def learnable(model: nn.Module) -> bool:
    """True while any quantizer of ``model`` learns its scale."""
    return any(isinstance(m, _Learnable) for m in model.modules())
