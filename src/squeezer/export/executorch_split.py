"""Wide output channels kept in float for the ExecuTorch lowering
(:mod:`squeezer.export.executorch`).

XNNPACK's static int8 Linear writes an int8 output: where squeezer keeps a Linear's output in
float and no squeezer quantizer reads it (a BERT layer's Linears: the attention products, GELU,
the residual sum and LayerNorm come next), that output is rounded once more, on one per-tensor
grid for all its channels. A transformer's outlier channels make that grid coarse for every
other channel: MiniLM's FFN output (``output.dense``) spans [-3, 195] while most channels stay
within a few units, a step of 0.77. Those channels are split off here: the Linear becomes

    y = q(x) + place(f(fq(x)))

``q`` the int8 Linear with the wide rows' weights and biases zeroed (its int8 output grid then
spans the other channels only), ``f`` a float Linear on the wide rows of squeezer's dequantized
weight, reading the input rounded to squeezer's own grid (``fq``: squeezer's input quantizer,
written out), and ``place`` a float 0/1 Linear putting its outputs back in their channels. All
three run in XNNPACK (two small FP32 GEMMs); a wide channel's output is squeezer's, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..data import forward
from ..graph import get_module, set_module
from .layers import _Act, _Layer

#: A channel is wide if its max |output| over the example exceeds this many times the median
#: channel's.
WIDE = 6.0


class _SplitLinear(nn.Module):
    """A Linear with its wide output channels in float (see the module's docstring)."""

    def __init__(self, lin: nn.Linear, wide: torch.Tensor, act: _Act) -> None:
        super().__init__()
        w = lin.weight.detach()
        b = lin.bias.detach() if lin.bias is not None else None
        idx = wide.nonzero().flatten()
        self.q = nn.Linear(lin.in_features, lin.out_features, bias=b is not None)
        self.f = nn.Linear(lin.in_features, len(idx), bias=b is not None)
        self.place = nn.Linear(len(idx), lin.out_features, bias=False)
        with torch.no_grad():
            self.q.weight.copy_(w.masked_fill(wide[:, None], 0.0))
            self.f.weight.copy_(w[idx])
            if b is not None:
                self.q.bias.copy_(b.masked_fill(wide, 0.0))
                self.f.bias.copy_(b[idx])
            self.place.weight.zero_()
            self.place.weight[idx, torch.arange(len(idx))] = 1.0
        self.scale, self.zero_point = float(act.scale), float(act.zero_point)
        self.qmin, self.qmax = float(act.qmin), float(act.qmax)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # squeezer's input quantizer (quant.primitives.fake_quantize), for the float branch
        k = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return self.q(x) + self.place(self.f((k - self.zero_point) * self.scale))


def _channel_amplitude(twin: nn.Module, fqns, example) -> dict[str, torch.Tensor]:
    """{FQN: max |output| of each output channel} of the twin's Linears on ``example``."""
    amp: dict[str, torch.Tensor] = {}

    def hook(fqn):
        def record(_m, _i, out):
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
            amp[fqn] = a if fqn not in amp else torch.maximum(amp[fqn], a)

        return record

    handles = [get_module(twin, f).register_forward_hook(hook(f)) for f in fqns]
    try:
        with torch.no_grad():
            forward(twin, example)
    finally:
        for h in handles:
            h.remove()
    return amp


def split_wide_channels(
    twin: nn.Module,
    fqns,
    layers: Mapping[str, _Layer],
    example,
    wide: float = WIDE,
) -> dict[str, int]:
    """Replace each Linear of ``fqns`` (int8 Linears whose output only XNNPACK quantizes) that
    has wide output channels on ``example`` by a :class:`_SplitLinear`, in place. Returns
    {FQN: number of channels kept in float}."""
    fqns = [f for f in fqns if isinstance(get_module(twin, f), nn.Linear)]
    amp = _channel_amplitude(twin, fqns, example)
    out = {}
    for fqn in fqns:
        a = amp.get(fqn)
        if a is None or a.numel() < 2:
            continue
        mask = a > wide * a.median()
        if mask.any() and not mask.all():
            set_module(twin, fqn, _SplitLinear(get_module(twin, fqn), mask, layers[fqn].act))
            out[fqn] = int(mask.sum())
    return out


__all__ = ["WIDE", "split_wide_channels"]
