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
  (an integer sum, the 1/n goes into the scale) and residual adds are integer ops; ReLU6 clamps at
  ``round(6 / scale)`` accumulator steps per channel (off by at most half a step, far finer than
  the next layer's codes);
* channel splits, zero padding (negative widths crop) and channel concatenation move integers
  unchanged (an accumulator's 0 is a real 0): each part or input keeps its per-channel scales, so
  the shift operation (split → pad → cat) and fire or ShuffleNet-style units cost no rounding.

It reproduces the fake-quant simulation it came from: values between quantizers are kept as exact
integer accumulators at fine scales (the simulation keeps them in float), and rounding is
half-to-even like ``torch.round``. What remains is float32 round-off in the simulation itself and
the rounding of biases to the accumulator's grid, so a code can differ by one step where the
simulation's value sits within ~1e-4 of a rounding tie; ``tests/integer/test_cnn.py`` counts
these. :func:`~squeezer.integer.fold.fold_batchnorm` folds BatchNorm into the preceding conv
before quantization (HAWQ-V3's order), which removes the BN bias rounding altogether.

The program's steps are in :mod:`.steps`; this module is the compiler that emits them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ConfigError, UnsupportedModelError
from ..graph import copy_model, get_module
from ..quant.modules import QuantEmbedding, QuantMixin
from .dyadic import to_dyadic
from .fold import _BATCHNORMS, _FOLDABLE, _bn_factors, _trace
from .steps import (
    Dequantize,
    IntAdd,
    IntAffine,
    IntClamp,
    IntConcat,
    IntegerModel,
    IntLayer,
    IntMaxPool,
    IntNarrow,
    IntPad,
    IntReLU,
    IntReshape,
    IntSumPool,
    QuantizeInput,
    Requantize,
)

#: Accumulators with a bias are refined (shifted left, the bias on the finer grid) up to this many
#: bits: bias rounding then costs ~2^-30 of the range, and dyadic multipliers keep 30–31 bits.
_WIDE_BITS = 30
#: Residual sums are rescaled to a grid of this many bits over their worst-case range.
_SUM_BITS = 30


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


def _option(node: torch.fx.Node, index: int, names: tuple[str, ...], default=None):
    """Argument ``index`` of a call, given by position or by one of its keyword ``names``."""
    if len(node.args) > index:
        return node.args[index]
    return next((node.kwargs[n] for n in names if n in node.kwargs), default)


def _is_channel_dim(dim, shape: tuple[int, ...]) -> bool:
    """Whether ``dim`` of a batched tensor (``shape`` without the batch) is the channel dim 1."""
    return isinstance(dim, int) and dim % (len(shape) + 1) == 1


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


#: Per-channel weight scales are floored at this fraction of the layer's largest one.
SCALE_FLOOR = 2.0**-12


def _floor_weight_scales(w_int: torch.Tensor, s_w: torch.Tensor):
    """Codes and scales with every per-channel weight scale at least ``SCALE_FLOOR`` × the
    layer's largest, the codes of a floored channel re-rounded to the coarser step. Applied only
    to a layer whose bias would otherwise be ≥ 2^31 accumulator steps.

    Why: trained networks have dead channels (weights of 0 to 1e-7, e.g. EfficientNet-Lite0's
    ImageNet weights); per-channel calibration gives them scales near 0, so their accumulator
    step is near 0 and a folded BatchNorm bias is astronomically many steps (≥ 2^31). At the
    floor such a channel's codes round to 0 (it outputs its bias, as it does in float to within
    its weights' 1e-7), and a live channel's codes are unchanged. A channel below the floor loses
    at most half a floor step per weight: 1/(2 · 127 · 4096) of the layer's largest weight.
    """
    floor = float(s_w.max()) * SCALE_FLOOR
    low = s_w < floor
    if not bool(low.any()):
        return w_int, s_w
    new_s = torch.where(low, torch.full_like(s_w, floor), s_w)
    ratio = (s_w / new_s).reshape(-1, *([1] * (w_int.dim() - 1)))
    return torch.round(w_int.double() * ratio).to(torch.int64), new_s


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
    if m.bias is not None and float((m.bias.detach().double() / (s_x * s_w)).abs().max()) >= 2**31:
        # only where the bias would not fit otherwise: everywhere else the codes stay the
        # simulation's own, bit for bit
        w_int, s_w = _floor_weight_scales(w_int, s_w)
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
    per-channel or per-tensor weights; supported in between: BatchNorm (eval), ReLU, ReLU6, max and
    average pooling, flatten/reshape, residual adds, Identity and Dropout, and on accumulators
    with per-channel scales: ``torch.split`` of the channels (dim 1), ``F.pad`` with constant zeros
    on the spatial dims (of the float input too) and ``torch.cat`` of channels (dim 1). ``qmodel``
    is not modified.

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

    def channel_scales(v: _Val, node: torch.fx.Node, what: str) -> torch.Tensor:
        """The per-channel scale vector of accumulator ``v``, which ``what`` needs."""
        where = node.target if node.op == "call_module" else node.name
        if not isinstance(v, _Val):
            raise UnsupportedModelError(f"{where}: {what} of a non-tensor is not supported")
        need_acc(v, node)
        s = _per_channel(v.scale, v.shape)
        if s is None:
            raise UnsupportedModelError(f"{where}: {what} needs per-channel scales")
        return s

    def value_of(a):
        # a list of nodes (torch.cat's tensors) maps to a list of values
        if isinstance(a, (list, tuple)) and any(isinstance(b, torch.fx.Node) for b in a):
            return [value_of(b) for b in a]
        return vals.get(a) if isinstance(a, torch.fx.Node) else a

    for node in gm.graph.nodes:
        args = [value_of(a) for a in node.args]
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
        x: _Val = args[0] if args else None
        target = node.target
        module = get_module(model, target) if node.op == "call_module" else None
        kind = (
            type(module)
            if module is not None
            else (target if node.op == "call_function" else f"method:{target}")
        )
        if kind in (torch.split, "method:split"):  # a tuple of parts: before the shape lookup
            s = channel_scales(x, node, "a split")
            sizes = _option(node, 1, ("split_size_or_sections", "split_size"))
            dim = _option(node, 2, ("dim",), 0)
            if isinstance(sizes, int) and sizes > 0:
                sizes = [min(sizes, x.shape[0] - c) for c in range(0, x.shape[0], sizes)]
            if (
                not _is_channel_dim(dim, x.shape)
                or not isinstance(sizes, (list, tuple))
                or not all(isinstance(n, int) and n >= 0 for n in sizes)
                or sum(sizes) != x.shape[0]
            ):
                raise UnsupportedModelError(
                    f"{node.name}: only splits of the channels (dim=1) into sizes known when "
                    "tracing are supported, e.g. torch.split(x, [16, 16], dim=1)"
                )
            parts, start = [], 0
            for k, n in enumerate(sizes):
                part = (n, *x.shape[1:])
                i = emit(f"{node.name}_{k}", IntNarrow(start, n), (x,))
                scale = _channel_shape(s[start : start + n], part)
                parts.append(_Val(i, "acc", part, scale, x.bound))
                start += n
            vals[node] = tuple(parts)
            continue
        shape = shape_of(node)

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
        elif kind in (nn.ReLU6, F.relu6):
            need_acc(x, node)
            top = torch.round(6.0 / x.scale).to(torch.int64)  # 6 in accumulator steps
            i = emit(node.target if module is not None else node.name, IntClamp(top), (x,))
            vals[node] = _Val(i, "acc", shape, x.scale, min(x.bound, int(top.max())))
        elif kind in (nn.MaxPool1d, nn.MaxPool2d):
            channel_scales(x, node, "max-pooling")
            i = emit(target, IntMaxPool(module), (x,))
            vals[node] = _Val(i, "acc", shape, x.scale, x.bound)
        elif kind in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d):
            dims = 2 if kind in (nn.AdaptiveAvgPool2d, nn.AvgPool2d) else 1
            s = channel_scales(x, node, "average pooling")
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
        elif kind is operator.getitem and isinstance(x, tuple) and isinstance(args[1], int):
            vals[node] = x[args[1]]  # part k of a split
        elif kind is F.pad:
            # the model input is padded in float (exact) before its quantizer; accumulators by
            # integers (an accumulator's 0 is a real 0)
            on_input = isinstance(x, _Val) and x.kind == "float"
            s = None if on_input else channel_scales(x, node, "padding")
            pad = _option(node, 1, ("pad",))
            mode = _option(node, 2, ("mode",), "constant")
            value = _option(node, 3, ("value",))
            if (
                mode != "constant"
                or value not in (None, 0)
                or not isinstance(pad, (list, tuple))
                or not all(isinstance(w, int) for w in pad)
                or len(pad) % 2
                or len(pad) // 2 >= len(x.shape)
            ):
                raise UnsupportedModelError(
                    f"{node.name}: only zero padding of the spatial dims has an integer form, "
                    "e.g. F.pad(x, (1, -1, 0, 0)) (mode='constant', value=0; no channel padding)"
                )
            i = emit(node.name, IntPad(tuple(pad)), (x,))
            if on_input:
                vals[node] = _Val(i, "float", shape)
            else:
                vals[node] = _Val(i, "acc", shape, _channel_shape(s, shape), x.bound)
        elif kind in (torch.cat, torch.concat, torch.concatenate):
            dim = _option(node, 1, ("dim", "axis"), 0)
            if not isinstance(x, list) or not _is_channel_dim(dim, shape):
                raise UnsupportedModelError(
                    f"{node.name}: only concatenation of the channels is supported, "
                    "e.g. torch.cat([a, b], dim=1)"
                )
            s = torch.cat([channel_scales(v, node, "concatenation") for v in x])
            i = emit(node.name, IntConcat(), tuple(x))
            vals[node] = _Val(i, "acc", shape, _channel_shape(s, shape), max(v.bound for v in x))
        else:
            raise UnsupportedModelError(
                f"{node.name} ({getattr(kind, '__name__', kind)}) has no integer implementation; "
                "supported: quantized conv/linear, BatchNorm, ReLU, ReLU6, max/avg pooling, "
                "flatten, add, split, pad, cat"
            )
    return IntegerModel(steps, points, steps_out_scale)
