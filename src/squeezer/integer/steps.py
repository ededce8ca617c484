"""The steps of an integer-only CNN program (:class:`IntegerModel`, made by
:func:`squeezer.integer.to_integer`): small modules whose forward is integer-only, with
:class:`QuantizeInput` and :class:`Dequantize` as the float boundary (HAWQ-V3, arXiv:2011.10680,
Sec. 3.3).

Accumulators are int64 throughout; each real rescaling is a dyadic multiplier ``b / 2^c`` applied
with one multiply and one rounding shift (:mod:`.dyadic`). Per-channel positive scales commute with
ReLU and max-pooling, so those run on accumulators unchanged; average pooling is an integer window
sum whose 1/n lives in the scale. Channel splits, zero padding and channel concatenation only move
integers (an accumulator's 0 is a real 0); their per-channel scales are the compiler's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .dyadic import requantize, shift_round
from .fold import _FOLDABLE


class QuantizeInput(nn.Module):
    """Float input → codes, exactly as the first layer's input quantizer rounds them."""

    def __init__(self, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().reshape(()))
        self.zero_point, self.qmin, self.qmax = zero_point, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x / self.scale) + self.zero_point  # same float ops as fake_quantize
        return torch.clamp(q, self.qmin, self.qmax).to(torch.int64)


class IntLayer(nn.Module):
    """Conv1d/Conv2d/Linear on codes: ``acc = ((W_q ⋆ (q − z_x)) << j) + b_q``, exact in int64.

    The int32 bias ``b_q`` sits on the accumulator grid ``s_x · s_w / 2^j``; ``j`` (0–16) is the
    largest refinement that keeps it in int32, so rounding the float bias costs ≤ 2^−(j+1) of an
    accumulator step instead of half a step.
    """

    def __init__(
        self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, zp: int, j: int
    ):
        super().__init__()
        self.kind = next(t.__name__ for t in _FOLDABLE if isinstance(layer, t))
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.zero_point, self.j = zp, j
        if self.kind != "Linear":
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = q - self.zero_point
        w = self.weight.to(torch.int64)
        if self.kind == "Linear":
            acc = F.linear(x, w)
        else:
            conv = F.conv2d if self.kind == "Conv2d" else F.conv1d
            acc = conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is None:
            return acc
        # channels: the last dim for a linear, dim 1 for a conv
        shape = (-1,) if self.kind == "Linear" else (-1,) + (1,) * (acc.dim() - 2)
        return (acc << self.j) + self.bias.to(torch.int64).reshape(shape)


class Requantize(nn.Module):
    """Accumulator → next layer's codes: ``clamp(round((a << e) · b / 2^c) + z, qmin, qmax)``."""

    def __init__(self, pre: int, b: torch.Tensor, c: torch.Tensor, zp: int, qmin: int, qmax: int):
        super().__init__()
        self.pre, self.zero_point, self.qmin, self.qmax = pre, zp, qmin, qmax
        self.register_buffer("multiplier", b)
        self.register_buffer("shift", c)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return requantize(
            a << self.pre, self.multiplier, self.shift, self.zero_point, self.qmin, self.qmax
        )


class IntAffine(nn.Module):
    """A BatchNorm on an accumulator: ``sign · (a << j) + bias`` (its scale is bookkeeping)."""

    def __init__(self, sign: torch.Tensor, j: int, bias: torch.Tensor):
        super().__init__()
        self.j = j
        self.register_buffer("sign", sign)
        self.register_buffer("bias", bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.sign * (a << self.j) + self.bias


class IntAdd(nn.Module):
    """Residual add of two accumulators at different scales: each rescaled by a dyadic number
    to a common fine grid, then added."""

    def __init__(self, terms: list[tuple[int, torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.pre = [t[0] for t in terms]
        for i, (_, b, c) in enumerate(terms):
            self.register_buffer(f"multiplier{i}", b)
            self.register_buffer(f"shift{i}", c)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = 0
        for i, a in enumerate(xs):
            b, c = getattr(self, f"multiplier{i}"), getattr(self, f"shift{i}")
            out = out + shift_round((a << self.pre[i]) * b, c)
        return out


class IntReLU(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.clamp(min=0)


class IntClamp(nn.Module):
    """ReLU6 on an accumulator: clamp to [0, top], ``top`` = 6 in accumulator steps per channel."""

    def __init__(self, top: torch.Tensor):
        super().__init__()
        self.register_buffer("top", top)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.minimum(a.clamp(min=0), self.top)


class IntMaxPool(nn.Module):
    """Max pooling of an accumulator (per-channel positive scales commute with max)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.dims = 2 if isinstance(pool, nn.MaxPool2d) else 1
        self.args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.dims == 2:
            return F.max_pool2d(a, *self.args)
        k, s, p, d, ceil = ((v[0] if isinstance(v, tuple) else v) for v in self.args)
        # max_pool1d has no int64 kernel: pool a (…, 1, L) image with a 1 × k window
        return F.max_pool2d(a.unsqueeze(-2), (1, k), (1, s), (0, p), (1, d), ceil).squeeze(-2)


class IntSumPool(nn.Module):
    """Average pooling as an integer window sum (the 1/n lives in the scale)."""

    def __init__(self, dims: int, window: int | None, stride: int | None):
        super().__init__()
        self.dims, self.window, self.stride = dims, window, stride

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(-self.dims, 0))
        if self.window is None:  # global
            return a.sum(dim=axes, keepdim=True)
        for d in range(2, 2 + self.dims):  # each unfold appends its window as a last dim
            a = a.unfold(d, self.window, self.stride)
        return a.sum(dim=axes)


class IntReshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(a.shape[0], *self.shape)


class IntNarrow(nn.Module):
    """One part of a channel split: channels ``start`` to ``start + length`` of an accumulator."""

    def __init__(self, start: int, length: int):
        super().__init__()
        self.start, self.length = start, length

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.narrow(1, self.start, self.length)


class IntPad(nn.Module):
    """Zero padding of an accumulator's spatial dims (``F.pad`` widths; negative widths crop), or
    of the float model input before its quantizer."""

    def __init__(self, pad: tuple[int, ...]):
        super().__init__()
        self.pad = tuple(pad)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.pad(a, self.pad)


class IntConcat(nn.Module):
    """Accumulators concatenated along the channels (each keeps its own channel scales)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, 1)


class Dequantize(nn.Module):
    """Final accumulator → float32 output (``a · scale``)."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return (a.double() * self.scale).float()


class IntegerModel(nn.Module):
    """The integer program made by :func:`~squeezer.integer.to_integer`: named steps run in order.

    ``forward(x)`` maps a float batch to float outputs; :meth:`run` exposes the integer values.
    ``points`` maps each simulated input quantizer's FQN (e.g. ``"conv2.input_quantizer"``) to
    the step that produces the same codes; ``output_scale`` is the real scale of the final
    accumulator.
    """

    def __init__(
        self,
        steps: list[tuple[str, nn.Module, tuple[int, ...]]],
        points: dict[str, str],
        output_scale: torch.Tensor,
    ):
        super().__init__()
        self.steps = nn.ModuleDict({name: m for name, m, _ in steps})
        self.program = [(name, inputs) for name, _, inputs in steps]
        self.points = dict(points)
        self.register_buffer("output_scale", output_scale)

    def run(
        self,
        x: torch.Tensor,
        *,
        overrides: Mapping[str, torch.Tensor] | None = None,
        record: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The final int64 accumulator (real value ``acc · output_scale``) and, with ``record``,
        every step's output by step name. ``overrides`` replaces named steps' outputs (used to
        compare one layer at a time against the simulation)."""
        values: list[torch.Tensor] = [x]
        records: dict[str, torch.Tensor] = {}
        for name, inputs in self.program[:-1]:  # the last step is the Dequantize boundary
            out = self.steps[name](*(values[i] for i in inputs))
            if record:
                records[name] = out
            if overrides is not None and name in overrides:
                out = overrides[name]
            values.append(out)
        last_inputs = self.program[-1][1]
        return values[last_inputs[0]], records

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc, _ = self.run(x)
        return self.steps[self.program[-1][0]](acc)
