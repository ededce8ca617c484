"""Integer-only CNN inference from a fake-quantized model (HAWQ-V3, arXiv:2011.10680, Sec. 3.3).

:func:`to_integer` compiles a model made by :func:`squeezer.quantize` (every conv/linear with an
input quantizer) into an :class:`IntegerModel` whose forward is integer arithmetic from the first
input quantizer to the last accumulator:

* weights are integer codes (int8 containers, int4 codes included) and each bias an int32 on the
  accumulator's grid ``s_x · s_w / 2^j`` (``j`` ≥ 0 extra bits where the int32 range allows, so
  the bias loses almost nothing to rounding); convolutions and matmuls accumulate exactly in int64;
* every real rescaling (accumulator → the next layer's input codes, residual branches → a common
  scale) is a dyadic multiplier ``b / 2^c`` applied with one multiply and one rounding shift;
* BatchNorm left after a quantized conv is a per-channel change of scale (free: bookkeeping) plus an
  integer bias; ReLU, max-pooling (per-channel positive scales commute with both), average pooling
  (an integer sum, the 1/n goes into the scale) and residual adds are integer ops.

It reproduces the fake-quant simulation it came from: values between quantizers are kept as exact
integer accumulators at fine scales (the simulation keeps them in float), and rounding is
half-to-even like ``torch.round``. What remains is float32 round-off in the simulation itself and
the rounding of biases to the accumulator's grid, so a code can differ by one step where the
simulation's value sits within ~1e-4 of a rounding tie; ``tests/test_integer_cnn.py`` counts
these. :func:`fold_batchnorm` folds BatchNorm into the preceding conv before quantization (HAWQ-V3's
order), which removes the BN bias rounding altogether.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ConfigError, UnsupportedModelError
from ..graph import copy_model, get_module, set_module
from ..quant.modules import QuantEmbedding, QuantMixin
from .dyadic import requantize, shift_round, to_dyadic

#: Accumulators with a bias are refined (shifted left, the bias on the finer grid) up to this many
#: bits: bias rounding then costs ~2^-30 of the range, and dyadic multipliers keep 30–31 bits.
_WIDE_BITS = 30
#: Residual sums are rescaled to a grid of this many bits over their worst-case range.
_SUM_BITS = 30

# ------------------------------------------------------------------------------------------------
# BatchNorm folding (float, before quantization)


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps squeezer's quantized layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantMixin) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types on dynamic control flow
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}); integer conversion needs "
            "a forward without data-dependent control flow"
        ) from exc
    return torch.fx.GraphModule(model, graph)


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _bn_factors(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, t) in float64 such that ``bn(y) = k · y + t`` per channel (eval mode)."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError(
            "BatchNorm without running statistics cannot be folded; build it with "
            "track_running_stats=True"
        )
    c = bn.running_mean.numel()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(c).double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(c).double()
    k = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    return k, beta - k * bn.running_mean.double()


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm that directly follows a conv/linear folded into it.

    The conv's weight becomes ``w · γ/σ`` (per output channel) and its bias
    ``(b − μ) · γ/σ + β``; the BatchNorm becomes ``nn.Identity``, so layer names (and plans keyed
    by them) are unchanged. Folding uses the running statistics: the result equals ``model`` in eval
    mode (to float round-off). Quantize the folded model, as HAWQ-V3 does, so the weight codes
    already include the BatchNorm.

    Example:
        >>> from squeezer.zoo import create
        >>> net = create("digits_cnn").eval()
        >>> folded = fold_batchnorm(net)
        >>> type(folded.bn1).__name__, folded.conv1.bias is not None
        ('Identity', True)
    """
    out = copy_model(model)
    gm = _trace(out)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(get_module(out, node.target), _BATCHNORMS):
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"):
            continue
        layer = get_module(out, prev.target)
        if type(layer) not in _FOLDABLE or len(prev.users) != 1:
            continue  # only plain float layers whose output feeds this BN alone
        k, t = _bn_factors(get_module(out, node.target))
        w = layer.weight.detach().double()
        layer.weight.copy_((w * k.reshape(-1, *([1] * (w.dim() - 1)))).to(layer.weight.dtype))
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(k)
        layer.bias = nn.Parameter((b * k + t).to(layer.weight.dtype))
        set_module(out, node.target, nn.Identity())
    return out


# ------------------------------------------------------------------------------------------------
# Integer steps: small modules whose forward is integer-only (QuantizeInput and Dequantize are the
# float boundary).


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


class Dequantize(nn.Module):
    """Final accumulator → float32 output (``a · scale``)."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return (a.double() * self.scale).float()


class IntegerModel(nn.Module):
    """The integer program made by :func:`to_integer`: named steps run in order.

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


# ------------------------------------------------------------------------------------------------
# Compilation


@dataclass
class _Val:
    """What the compiler knows about a value: its kind, real scale and integer bound."""

    id: int
    kind: str  # "float" (the model input), "codes" (a layer's input codes), "acc" (accumulator)
    shape: tuple[int, ...]  # without the batch dimension
    scale: torch.Tensor | None = None  # float64, broadcastable to shape
    bound: int = 0  # max |integer value| (acc)


def _per_channel(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The per-channel (dim 0 of ``shape``) scale vector, if ``scale`` is constant elsewhere."""
    full = scale.expand(shape).reshape(shape[0], -1)
    if bool((full == full[:, :1]).all()):
        return full[:, 0]
    return None


def _channel_shape(vec: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return vec.reshape(-1, *([1] * (len(shape) - 1)))


def _dyadic_for(ratio: torch.Tensor, bound: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(pre-shift e, b, c) with ``(a << e) · b / 2^c ≈ a · ratio`` for ``|a| ≤ bound``, using the
    most multiplier bits that keep the int64 product below 2^62."""
    rmax = float(ratio.max()) if ratio.numel() else 0.0
    for e in range(0, 48):
        bits = min(31, 61 - (max(bound, 1) << e).bit_length())
        if bits < 8:
            break
        if rmax < 2.0 ** (bits - 1) * (1 - 2.0**-bits):
            b, c = to_dyadic(ratio / 2.0**e, bits=bits)
            return e, b, c
    raise UnsupportedModelError(
        f"a rescale by up to {rmax:g} of values up to {bound} does not fit 64-bit integer "
        "arithmetic; check for degenerate (near-zero) quantization scales"
    )


def _layer_consts(m: nn.Module, s_x: float, qmin: int, qmax: int, zp: int):
    """Integer weight, bias and output scale/bound of a quantized conv/linear."""
    spec = m.spec
    if spec.granularity == "group":
        raise UnsupportedModelError(
            "group-wise weight scales do not give one accumulator scale per output channel; "
            "quantize with granularity='channel' for integer-only inference"
        )
    wq = m.weight_quantizer
    codes = wq.codes(m.weight).to(torch.int64)
    wzp = wq.zero_point.reshape(-1).round().to(torch.int64)
    w_int = codes - wzp.reshape(-1, *([1] * (codes.dim() - 1)))
    out_ch = codes.shape[0]
    s_w = wq.scale.reshape(-1).double().expand(out_ch)
    s_acc = s_x * s_w  # float64: the exact product of the two float32 scales
    small = int(w_int.abs().max()) < 128
    weight = w_int.to(torch.int8 if small else torch.int16)
    xmax = max(abs(qmin - zp), abs(qmax - zp))
    bound = int(w_int.abs().reshape(out_ch, -1).sum(1).max()) * xmax
    if m.bias is None:
        return weight, None, 0, s_acc, bound
    b = m.bias.detach().double() / s_acc
    top = int(b.abs().max().ceil())
    j = max(0, min(16, 30 - top.bit_length(), _WIDE_BITS - bound.bit_length()))
    bias = torch.round(b * 2.0**j).to(torch.int64)
    if int(bias.abs().max()) >= 2**31:
        raise UnsupportedModelError(
            f"the bias of {m.__class__.__name__} is ≥ 2^31 accumulator steps; its input or weight "
            "scale is degenerate (recalibrate with more data)"
        )
    return weight, bias.to(torch.int32), j, s_acc / 2.0**j, (bound << j) + int(bias.abs().max())


@torch.no_grad()
def to_integer(qmodel: nn.Module, example: torch.Tensor | None = None) -> IntegerModel:
    """Compile a fake-quantized CNN into an integer-only :class:`IntegerModel`.

    Every quantized layer must quantize its input (``act_bits``) with per-tensor activations and
    per-channel or per-tensor weights; supported in between: BatchNorm (eval), ReLU, max and
    average pooling, flatten/reshape, residual adds, Identity and Dropout. ``qmodel`` is not
    modified.

    Args:
        qmodel: a model from :func:`squeezer.quantize` (BatchNorm folded or not).
        example: a float batch of inputs, for shapes; defaults to zeros of ``qmodel.input_shape``.

    Returns:
        An :class:`IntegerModel`; ``imodel(x)`` reproduces ``qmodel(x)``.

    Raises:
        UnsupportedModelError: for a layer or operation that has no integer form here.

    Example:
        >>> import squeezer as sq
        >>> from squeezer.pipeline import uniform_plan
        >>> net = sq.load_model("zoo:digits_cnn").eval()
        >>> x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> qmodel = sq.quantize(fold_batchnorm(net), uniform_plan(net, 8), calib=[x])
        >>> imodel = to_integer(qmodel)
        >>> bool((imodel(x) - qmodel(x)).abs().max() < 1e-3)
        True
    """
    model = copy_model(qmodel).eval()
    if example is None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ConfigError("to_integer needs example=<a batch of inputs> to learn the shapes")
        example = torch.zeros(1, *shape)
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        raise UnsupportedModelError("to_integer handles models with one float tensor input (CNNs)")
    gm = _trace(model)
    ShapeProp(gm).propagate(example)
    steps: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    points: dict[str, str] = {}
    vals: dict[torch.fx.Node, _Val] = {}

    def emit(name: str, module: nn.Module, inputs: tuple[_Val, ...]) -> int:
        name = name.replace(".", "__")
        while name in {s[0] for s in steps}:
            name += "_"
        steps.append((name, module, tuple(v.id for v in inputs)))
        return len(steps)

    def shape_of(node: torch.fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise UnsupportedModelError(f"{node.name} does not produce one tensor")
        return tuple(meta.shape[1:])

    def need_acc(v: _Val, node: torch.fx.Node) -> None:
        if v.kind != "acc":
            raise UnsupportedModelError(
                f"{node.name} ({node.target}) runs on the float input before any quantized layer; "
                "integer-only inference needs the first layer to quantize the input"
            )

    for node in gm.graph.nodes:
        args = [vals.get(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
        if node.op == "placeholder":
            if vals:
                raise UnsupportedModelError("to_integer handles models with a single input")
            vals[node] = _Val(0, "float", shape_of(node))
            continue
        if node.op == "output":
            out = args[0]
            if not isinstance(out, _Val) or out.kind != "acc":
                raise UnsupportedModelError("the model must return one tensor from a layer")
            emit("output", Dequantize(out.scale), (out,))
            steps_out_scale = out.scale
            continue
        if node.op == "get_attr":
            raise UnsupportedModelError(f"{node.target}: tensors read in forward are not supported")
        shape = shape_of(node)
        x: _Val = args[0] if args else None
        target = node.target
        module = get_module(model, target) if node.op == "call_module" else None
        kind = (
            type(module)
            if module is not None
            else (target if node.op == "call_function" else f"method:{target}")
        )

        if isinstance(module, QuantEmbedding):
            raise UnsupportedModelError("embeddings are not part of integer-only CNN inference")
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise UnsupportedModelError(
                f"layer {target!r} is a {type(module).__name__.removeprefix('Quant')}, which "
                "integer-only inference does not support; run the model in ONNX Runtime "
                "(squeezer export) instead"
            )
        if isinstance(module, QuantMixin):
            aq = module.input_quantizer
            if aq is None:
                raise UnsupportedModelError(
                    f"layer {target!r} quantizes only its weights; integer-only inference needs "
                    "activations quantized too (act_bits=8)"
                )
            if not bool(aq.calibrated):
                raise ConfigError(
                    f"layer {target!r} has an uncalibrated input quantizer; pass calib=... to quantize()"
                )
            qmin, qmax = aq.qparams().qmin, aq.qparams().qmax
            zp, s_x = int(aq.zero_point.round()), aq.scale.reshape(())
            point = f"{target}.input_quantizer"
            if x.kind == "float":
                i = emit(point, QuantizeInput(s_x, zp, qmin, qmax), (x,))
            else:
                e, b, c = _dyadic_for(x.scale / float(s_x), x.bound)
                i = emit(point, Requantize(e, b, c, zp, qmin, qmax), (x,))
            points[point] = steps[i - 1][0]
            weight, bias, jb, s_acc, bound = _layer_consts(module, float(s_x), qmin, qmax, zp)
            codes = _Val(i, "codes", x.shape)
            j = emit(target, IntLayer(module, weight, bias, zp, jb), (codes,))
            # conv channels are dim 1 (scale (C, 1, ...)); a linear's features are the last dim
            scale = s_acc if isinstance(module, nn.Linear) else _channel_shape(s_acc, shape)
            vals[node] = _Val(j, "acc", shape, scale, bound)
        elif isinstance(module, _FOLDABLE):
            raise UnsupportedModelError(
                f"layer {target!r} is not quantized; integer-only inference needs every layer "
                "quantized (drop it from the plan's skip list)"
            )
        elif isinstance(module, _BATCHNORMS):
            need_acc(x, node)
            s = _per_channel(x.scale, x.shape)
            if s is None:
                raise UnsupportedModelError(
                    f"{target}: BatchNorm on a tensor without channel scales"
                )
            k, t = _bn_factors(module)
            sign = torch.sign(k).to(torch.int64)
            s_new = torch.where(k == 0, s, s * k.abs())
            jshift = max(0, min(16, _WIDE_BITS - x.bound.bit_length()))
            bias = torch.round(t * 2.0**jshift / s_new).to(torch.int64)
            sh = _channel_shape(s_new, shape)
            i = emit(
                target,
                IntAffine(_channel_shape(sign, shape), jshift, _channel_shape(bias, shape)),
                (x,),
            )
            bound = (x.bound << jshift) + int(bias.abs().max())
            vals[node] = _Val(i, "acc", shape, sh / 2.0**jshift, bound)
        elif kind in (nn.ReLU, F.relu, torch.relu, "method:relu"):
            need_acc(x, node)
            vals[node] = _Val(emit(node.name, IntReLU(), (x,)), "acc", shape, x.scale, x.bound)
        elif kind in (nn.MaxPool1d, nn.MaxPool2d):
            need_acc(x, node)
            if _per_channel(x.scale, x.shape) is None:
                raise UnsupportedModelError(f"{target}: max-pooling needs per-channel scales")
            i = emit(target, IntMaxPool(module), (x,))
            vals[node] = _Val(i, "acc", shape, x.scale, x.bound)
        elif kind in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d):
            need_acc(x, node)
            dims = 2 if kind in (nn.AdaptiveAvgPool2d, nn.AvgPool2d) else 1
            s = _per_channel(x.scale, x.shape)
            if s is None:
                raise UnsupportedModelError(f"{target}: average pooling needs per-channel scales")
            if kind in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
                if any(d != 1 for d in shape[1:]):
                    raise UnsupportedModelError(f"{target}: only global adaptive pooling (to 1)")
                window, stride, n = None, None, math.prod(x.shape[1:])
            else:
                k, st = module.kernel_size, module.stride
                k = k[0] if isinstance(k, tuple) else k
                st = st[0] if isinstance(st, tuple) else st
                pad = module.padding
                if (pad[0] if isinstance(pad, tuple) else pad) or module.ceil_mode:
                    raise UnsupportedModelError(f"{target}: average pooling without padding only")
                window, stride, n = k, st, k**dims
            i = emit(target, IntSumPool(dims, window, stride), (x,))
            vals[node] = _Val(i, "acc", shape, _channel_shape(s, shape) / n, x.bound * n)
        elif kind in (nn.Flatten, torch.flatten, "method:flatten", "method:view", "method:reshape"):
            if len(shape) < 1 or (kind is nn.Flatten and module.start_dim != 1):
                raise UnsupportedModelError(f"{node.name}: only reshapes that keep the batch dim")
            i = emit(node.name, IntReshape(shape), (x,))
            scale = None if x.scale is None else x.scale.expand(x.shape).reshape(shape)
            vals[node] = _Val(i, x.kind, shape, scale, x.bound)
        elif kind in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d):
            vals[node] = x
        elif kind in (operator.add, operator.iadd, torch.add) and len(args) == 2:
            a, b = args
            if not (isinstance(a, _Val) and isinstance(b, _Val)) or node.kwargs:
                raise UnsupportedModelError(f"{node.name}: only tensor + tensor adds are supported")
            need_acc(a, node)
            need_acc(b, node)
            sa, sb = a.scale.expand(shape), b.scale.expand(shape)
            s_out = (max(a.bound, 1) * sa + max(b.bound, 1) * sb) / 2.0**_SUM_BITS
            terms = [_dyadic_for(v.scale.expand(shape) / s_out, v.bound) for v in (a, b)]
            i = emit(node.name, IntAdd(terms), (a, b))
            vals[node] = _Val(i, "acc", shape, s_out, 2**_SUM_BITS + 2)
        else:
            raise UnsupportedModelError(
                f"{node.name} ({getattr(kind, '__name__', kind)}) has no integer implementation; "
                "supported: quantized conv/linear, BatchNorm, ReLU, max/avg pooling, flatten, add"
            )
    return IntegerModel(steps, points, steps_out_scale)
