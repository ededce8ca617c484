"""The PT2E side of the ExecuTorch lowering (:mod:`squeezer.export.executorch`): XNNPACK's
quantizer annotates the float twin, and these helpers make its observers carry squeezer's own
scales and zero points, keep transformers' integer mask arithmetic integer, and quantize an
elementwise join only where it joins int8 tensors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import ExportError
from .layers import _Layer


def _floating(node) -> bool:
    """Whether a node computes a float tensor: integer arithmetic (a text model's position and
    mask indices) is never quantized."""
    val = node.meta.get("val")
    return not isinstance(val, torch.Tensor) or val.dtype.is_floating_point


_ELEMENTWISE = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)
_PASS_THROUGH = ("relu", "hardtanh", "clamp", "getitem")


def _int8_chain(node) -> bool:
    """Whether an ``add``/``mul`` joins int8 tensors only: each operand made by a Conv/Linear
    (or such a join), through ReLUs. Only there does quantizing it keep XNNPACK's int8 chain
    (a ResNet's residual sum). Elsewhere its range is one squeezer never rounds to and
    possibly huge: an attention-mask sum spans float's minimum, which would flatten every
    score; a GELU's ``x * 0.5`` would round its input again."""
    for arg in node.args:
        while getattr(arg, "op", None) == "call_function" and any(
            k in str(arg.target) for k in _PASS_THROUGH
        ):
            arg = arg.args[0]
        if getattr(arg, "op", None) != "call_function":
            return False
        if not any(k in str(arg.target) for k in ("conv", "linear")) and not (
            arg.target in _ELEMENTWISE and _int8_chain(arg)
        ):
            return False
    return True


def _integer_constants(gm):
    """Undo the float type XNNPACKQuantizer's ``transform_for_annotation`` gives the scalar
    operands of integer arithmetic. It turns every scalar operand of ``add``/``mul`` into a
    float32 0-dim tensor, also in integer index arithmetic (transformers' attention-mask code
    adds 0 to an ``arange``), which makes the sum float and the ``aten.index`` it feeds fail
    ("tensors used as indices must be long, int, byte or bool tensors"). Such a constant is
    cast to the dtype the node computed in the exported graph."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or _floating(node):
            continue
        if node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor):
            continue
        dtype = node.meta["val"].dtype
        for arg in node.args:
            if getattr(arg, "op", None) != "get_attr":
                continue
            const = getattr(gm, arg.target)
            if const.dim() == 0 and const.is_floating_point() and float(const) == int(const):
                setattr(gm, arg.target, const.to(dtype))
                arg.meta["val"] = arg.meta["val"].to(dtype)
    gm.recompile()
    return gm


def _module_of(node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _fix_qparams(
    prepared, layers: Mapping[str, _Layer], status, scales
) -> tuple[int, int, set[str]]:
    """Give the observers of each lowered layer's weight and input squeezer's parameters, and
    the others (tensors squeezer keeps in float) their whole observed range: XNNPACK's default
    histogram observer clips, which squeezer never does there (it clipped MiniLM's FFN input
    to GELU at 5 where it reaches 25). Returns (observers with squeezer's parameters, observers
    left with observed ranges, the lowered layers whose output has an observed range)."""
    modules = dict(prepared.named_modules())
    fixed: dict[int, tuple] = {}
    lowered = []
    for node in prepared.graph.nodes:
        if node.op != "call_function" or not any(k in str(node.target) for k in ("conv", "linear")):
            continue
        fqn = _module_of(node)
        if fqn not in layers or not status[fqn].startswith("xnnpack"):
            continue
        layer = layers[fqn]
        x_obs, w_obs = (_observer(prepared, a) for a in node.args[:2])
        if x_obs is None or w_obs is None:
            raise ExportError(
                f"XNNPACK's quantizer left layer {fqn!r} unquantized (its pattern is not one "
                "XNNPACK lowers); keep its activations in float (act_bits=None)"
            )
        s = torch.tensor(scales[fqn], dtype=torch.float32)
        _set(fixed, w_obs, fqn, s, torch.zeros(len(s), dtype=torch.int64), layer.qmin, layer.qmax)
        a = layer.act
        shift = -128 if a.qmin == 0 else 0  # uint8 codes -> int8 codes, same real values
        _set(fixed, x_obs, fqn, a.scale, a.zero_point + shift, a.qmin + shift, a.qmax + shift)
        lowered.append((fqn, node))
    observers = {
        id(m): m
        for m in modules.values()
        if type(m).__name__.endswith(("Observer", "FakeQuantize"))
    }
    for key, obs in observers.items():
        if key not in fixed:
            _whole_range(obs)
    observed = {
        fqn
        for fqn, node in lowered
        for user in node.users
        if (m := _observer(prepared, user)) is not None and id(m) not in fixed
    }
    return len(fixed), len(set(observers) - set(fixed)), observed


def _whole_range(obs) -> None:
    """Affine int8 parameters covering all an observer saw (and 0), not a clipped range."""
    lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    if not isinstance(lo, torch.Tensor) or lo.numel() != 1 or not torch.isfinite(lo + hi):
        return
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = int(obs.quant_min), int(obs.quant_max)
    scale = max((hi - lo) / (qmax - qmin), 2**-12)
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    qp = (torch.tensor([scale]), torch.tensor([zp]))
    obs.calculate_qparams = lambda qp=qp: qp


def _observer(modules, node):
    if getattr(node, "op", None) != "call_module":
        return None
    m = getattr(modules, str(node.target), None)  # a shared observer is under several names
    return m if m is not None and hasattr(m, "calculate_qparams") else None


def _set(fixed: dict, obs, fqn: str, scale, zero_point, qmin: int, qmax: int) -> None:
    key = (
        tuple(np.atleast_1d(np.asarray(scale, dtype=np.float32)).tolist()),
        tuple(np.atleast_1d(np.asarray(zero_point)).tolist()),
    )
    prev = fixed.get(id(obs))
    if prev is not None and prev[1] != key:
        raise ExportError(
            f"layers {prev[0]!r} and {fqn!r} read one tensor with different squeezer scales; "
            "XNNPACK's graph quantizes a tensor once"
        )
    if isinstance(scale, torch.Tensor):
        qp = (scale, zero_point)
    else:
        qp = (torch.tensor([float(scale)]), torch.tensor([int(zero_point)]))
    obs.calculate_qparams = lambda qp=qp: qp
    obs.quant_min, obs.quant_max = int(qmin), int(qmax)
    fixed[id(obs)] = (fqn, key)
