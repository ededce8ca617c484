"""The Quant* layers of a fake-quantized model in integer form: :class:`_Layer` (weight codes,
scales and zero points, rows = output channels, the weight's channel axis moved to the front)
with its input's activation quantizer :class:`_Act`, collected by :func:`_collect_layers`; and
the model's float twin (:func:`_float_twin`), whose Quant* layers are float layers holding the
dequantized weights, which is what the TorchScript exporter traces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import LayerQuant
from ..errors import ExportError
from ..graph import copy_model, set_module
from ..quant.modules import QUANT_MODULES, QuantMixin
from ..quant.primitives import qrange


@dataclass(frozen=True)
class _Act:
    """An activation quantizer: scale, zero point and code range."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass
class _Layer:
    """One Quant* layer's integer form, rows = output channels (embedding rows): the weight's
    ``channel_axis`` (1 for a transposed convolution, else 0) moved to the front."""

    fqn: str
    kind: str  # "conv", "conv_transpose", "linear", "embedding"
    spec: LayerQuant
    shape: tuple[int, ...]
    weight: np.ndarray  # the dequantized weight (what the float twin holds), float32
    codes: np.ndarray  # (rows, K) int64
    scale: np.ndarray  # (rows, G) float32
    zero_point: np.ndarray  # (rows, G) int64
    qmin: int
    qmax: int
    act: _Act | None
    status: str = "float (not found in the exported graph)"
    block: int = 0  # MatMulNBits block size, once written
    channel_axis: int = 0

    @property
    def per_tensor(self) -> bool:
        return self.spec.granularity == "tensor"

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """The weight's shape with the channel axis moved to the front."""
        a, shape = self.channel_axis, self.shape
        return (shape[a], *shape[:a], *shape[a + 1 :])

    @property
    def rows_perm(self) -> list[int]:
        """The Transpose ``perm`` taking an array of :attr:`rows_shape` to :attr:`shape`."""
        a = self.channel_axis
        return [*range(1, a + 1), 0, *range(a + 1, len(self.shape))]

    def native(self, rows: np.ndarray) -> np.ndarray:
        """A (rows, K) array (codes, dequantized weights) in the weight's own layout."""
        return np.moveaxis(rows.reshape(self.rows_shape), 0, self.channel_axis)


@torch.no_grad()
def _collect_layers(qmodel: nn.Module) -> dict[str, _Layer]:
    layers = {}
    for fqn, m in qmodel.named_modules():
        if not isinstance(m, QuantMixin):
            continue
        w = m.weight.detach().float()
        wq = m.weight_quantizer
        qp = wq.qparams()
        axis = wq.channel_axis
        rows = w.shape[axis]
        codes = wq.codes(w).to(torch.int64).movedim(axis, 0).reshape(rows, -1)
        scale = qp.scale.float().reshape(qp.scale.shape[0], -1).expand(rows, -1)
        zp = torch.round(qp.zero_point).to(torch.int64).reshape(qp.scale.shape[0], -1)
        zp = zp.expand(rows, -1)
        act = None
        aq = m.input_quantizer
        if aq is not None:
            if not bool(aq.calibrated):
                raise ExportError(
                    f"layer {fqn!r} has an uncalibrated activation quantizer; quantize with "
                    "calib=... before exporting"
                )
            lo, hi = qrange(aq.bits, aq.symmetric)
            act = _Act(float(aq.scale.float()), int(round(float(aq.zero_point))), lo, hi)
        if isinstance(m, nn.Embedding):
            kind = "embedding"
        elif isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, nn.modules.conv._ConvTransposeNd):
            kind = "conv_transpose"
        else:
            kind = "conv"
        layers[fqn] = _Layer(
            fqn=fqn,
            kind=kind,
            spec=m.spec,
            shape=tuple(w.shape),
            weight=wq(w).float().numpy().copy(),
            codes=codes.numpy().copy(),
            scale=scale.numpy().astype(np.float32).copy(),
            zero_point=zp.numpy().copy(),
            qmin=qp.qmin,
            qmax=qp.qmax,
            act=act,
            channel_axis=axis,
        )
    if not layers:
        raise ExportError(
            "the model has no quantized layers; quantize it first (squeezer.quantize) or export "
            "the float model with export_float_onnx"
        )
    return layers


def _float_twin(
    qmodel: nn.Module, layers: Mapping[str, _Layer], *, dequantized: bool = True
) -> nn.Module:
    """A copy of ``qmodel`` whose Quant* layers are plain float layers holding the dequantized
    weights (or, with ``dequantized=False``, the float weights: the FP32 model)."""
    twin = copy_model(qmodel)
    float_type = {q: f for f, q in QUANT_MODULES.items()}
    for fqn, m in list(twin.named_modules()):
        if not isinstance(m, QuantMixin):
            continue
        base = float_type[type(m)]
        f = base.__new__(base)
        f.__dict__.update(m.__dict__)
        f.__dict__.pop("spec", None)
        f._modules = {
            k: v for k, v in m._modules.items() if k not in ("weight_quantizer", "input_quantizer")
        }
        f._parameters = dict(m._parameters)
        if dequantized:
            f._parameters["weight"] = nn.Parameter(
                torch.from_numpy(layers[fqn].weight.copy()), requires_grad=False
            )
        set_module(twin, fqn, f)
    return twin.eval()
