"""Quantized layers: Linear, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d and Embedding with
weight and input-activation quantizers.

Each ``Quant*`` class subclasses its float layer, so FQNs, parameter names and ``isinstance`` checks
are unchanged; only ``forward`` differs (fake quantization: integer-valued codes times a scale, in
float, which is what the integer path must reproduce bit for bit).

Per-channel scales run along the output channels: dim 0 of the weight, except for transposed
convolutions, whose weight is (in_channels, out_channels / groups, k...) and which quantize along
dim 1 (:func:`squeezer.graph.weight_channel_axis`), as ONNX's DequantizeLinear ``axis=1`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerQuant
from ..errors import ConfigError
from ..graph import weight_channel_axis
from .primitives import QParams, fake_quantize, grouped_view, observe, qrange, ungrouped_view

#: At most this many activation values are kept per layer for percentile/MSE calibration.
_RESERVOIR = 1 << 20


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight tensor with parameters fixed by :meth:`calibrate`.

    The scale and zero point are buffers (saved with the model), in grouped-view shape with rows
    along ``channel_axis`` (the weight's output-channel axis). Call :meth:`calibrate` again after
    the weight changes (as QAT does each step).
    """

    def __init__(self, spec: LayerQuant, channel_axis: int = 0):
        super().__init__()
        self.spec = spec
        self.channel_axis = int(channel_axis)
        self.register_buffer("scale", torch.ones(1, 1, 1))
        self.register_buffer("zero_point", torch.zeros(1, 1, 1))
        #: False passes weights through in float (used while calibrating activations).
        self.enabled = True

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        s = self.spec
        qp = observe(self.grouped(weight), s.bits, s.symmetric, s.observer)
        self.scale = qp.scale.to(weight.dtype)
        self.zero_point = qp.zero_point.to(weight.dtype)

    def qparams(self) -> QParams:
        qmin, qmax = qrange(self.spec.bits, self.spec.symmetric)
        return QParams(self.scale, self.zero_point, qmin, qmax)

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a weight, or its codes) in the grouped view its scales are shaped for."""
        return grouped_view(t, self.spec.granularity, self.spec.group_size, self.channel_axis)

    def ungrouped(self, tg: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The inverse of :meth:`grouped` for a weight of ``shape``."""
        return ungrouped_view(tg, shape, self.channel_axis)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return self.ungrouped(fake_quantize(self.grouped(weight), self.qparams()), weight.shape)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``weight`` in its own shape (an int16 tensor)."""
        qp = self.qparams()
        wg = self.grouped(weight.detach())
        q = torch.clamp(torch.round(wg / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
        return self.ungrouped(q, weight.shape).to(torch.int16)


class ActQuantizer(nn.Module):
    """Per-tensor fake quantization of a layer's input, with ranges found by calibration.

    While ``observing`` is True it passes inputs through unchanged and keeps a sample of their values;
    :meth:`freeze` turns the sample into a scale and zero point with the spec's observer.
    """

    def __init__(self, bits: int, symmetric: bool, observer: str, percentile: float):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.observer, self.percentile = observer, percentile
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observing = False
        self._sample: list[torch.Tensor] = []
        self._seen = 0
        self._gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()
        self._seen += flat.numel()
        # Keep extremes exactly (min-max must see them) and a uniform subsample for percentiles.
        keep = _RESERVOIR // 8
        if flat.numel() > keep:
            idx = torch.randint(flat.numel(), (keep,), generator=self._gen)
            flat = torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])
        self._sample.append(flat)

    @torch.no_grad()
    def freeze(self) -> None:
        if not self._sample:
            raise ConfigError(
                "activation quantization needs calibration data; pass calib=... to quantize()"
            )
        xs = torch.cat(self._sample).reshape(1, 1, -1)
        qp = observe(xs, self.bits, self.symmetric, self.observer, self.percentile)
        self.scale = qp.scale.reshape(()).to(self.scale.device)
        self.zero_point = qp.zero_point.reshape(()).to(self.scale.device)
        self.calibrated = torch.tensor(True, device=self.scale.device)
        self._sample, self._seen, self.observing = [], 0, False

    def qparams(self) -> QParams:
        qmin, qmax = qrange(self.bits, self.symmetric)
        return QParams(self.scale, self.zero_point, qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not bool(self.calibrated):
            raise ConfigError(
                "activation quantizer used before calibration; pass calib=... to quantize()"
            )
        return fake_quantize(x, self.qparams())


class QuantMixin:
    """Shared set-up of the Quant* layers: a weight quantizer and an optional input quantizer."""

    spec: LayerQuant

    def _setup(self, spec: LayerQuant) -> None:
        self.spec = spec
        self.weight_quantizer = WeightQuantizer(spec, weight_channel_axis(self))
        self.weight_quantizer.calibrate(self.weight)
        self.input_quantizer = (
            ActQuantizer(spec.act_bits, spec.act_symmetric, spec.act_observer, spec.act_percentile)
            if spec.act_bits is not None
            else None
        )

    def qweight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def qinput(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def extra_repr(self) -> str:  # shown by print(model)
        act = f", act_bits={self.spec.act_bits}" if self.spec.act_bits else ""
        return f"{super().extra_repr()}, bits={self.spec.bits}, {self.spec.granularity}{act}"


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.qinput(x), self.qweight(), self.bias)


class QuantConv1d(QuantMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.qinput(x), self.qweight(), self.bias)


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.qinput(x), self.qweight(), self.bias)


def _conv_transpose(layer: nn.Module, fn, x: torch.Tensor, output_size, dims: int) -> torch.Tensor:
    """``layer``'s transposed convolution on the fake-quantized input and weight; ``output_size``
    picks the output padding as ``nn.ConvTranspose*d`` does."""
    x = layer.qinput(x)
    output_padding = layer._output_padding(
        x, output_size, layer.stride, layer.padding, layer.kernel_size, dims, layer.dilation
    )
    return fn(
        x,
        layer.qweight(),
        layer.bias,
        layer.stride,
        layer.padding,
        output_padding,
        layer.groups,
        layer.dilation,
    )


class QuantConvTranspose1d(QuantMixin, nn.ConvTranspose1d):
    """ConvTranspose1d with weights quantized per output channel along dim 1 of the weight."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose(self, F.conv_transpose1d, x, output_size, 1)


class QuantConvTranspose2d(QuantMixin, nn.ConvTranspose2d):
    """ConvTranspose2d with weights quantized per output channel along dim 1 of the weight."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose(self, F.conv_transpose2d, x, output_size, 2)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """Embedding with quantized table rows; its input (indices) is never quantized."""

    def _setup(self, spec: LayerQuant) -> None:
        super()._setup(spec)
        self.input_quantizer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x,
            self.qweight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


#: Float layer type -> quantized type. A new layer kind adds a class and an entry here.
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Embedding: QuantEmbedding,
}


def to_quant_module(module: nn.Module, spec: LayerQuant) -> nn.Module:
    """A quantized copy of ``module`` sharing nothing with it."""
    cls = QUANT_MODULES.get(type(module))
    if cls is None:
        raise ConfigError(
            f"cannot quantize a {type(module).__name__}; supported: "
            + ", ".join(t.__name__ for t in QUANT_MODULES)
        )
    q = cls.__new__(cls)
    q.__dict__.update({k: v for k, v in module.__dict__.items()})
    # Fresh containers so the copy shares no parameter/buffer/module dicts with the original.
    q._parameters = {
        k: (nn.Parameter(v.detach().clone(), v.requires_grad) if v is not None else None)
        for k, v in module._parameters.items()
    }
    q._buffers = {k: (v.clone() if v is not None else None) for k, v in module._buffers.items()}
    q._modules = dict(module._modules)
    q._setup(spec)
    return q
