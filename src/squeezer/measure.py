"""Measurement: parameters, bytes at a plan's bit-widths (scales and zero points included), MACs and
BOPs per layer (from shapes seen in a real forward pass), and CPU latency (warm-up, median of N).

BOPs follow HAWQ-V3: MACs × weight bits × activation bits, with float operands counted at 32 bits.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .config import LayerQuant, Plan
from .data import forward
from .graph import layer_type, quantizable_layers, split_attention, weight_channel_axis
from .quant.primitives import grouped_view

FLOAT_BITS = 32


def param_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def n_scales(weight: torch.Tensor, spec: LayerQuant, channel_axis: int = 0) -> int:
    """How many (scale, zero point) pairs a weight needs under ``spec`` (channels along
    ``channel_axis``: :func:`squeezer.graph.weight_channel_axis` of its layer)."""
    g = grouped_view(weight.detach(), spec.granularity, spec.group_size, channel_axis)
    return g.shape[0] * g.shape[1]


def weight_bytes(weight: torch.Tensor, spec: LayerQuant | None, channel_axis: int = 0) -> float:
    """Bytes of one weight tensor: packed codes at ``spec.bits`` plus a float32 scale per group (and
    an 8-bit zero point per group when asymmetric); float32 when ``spec`` is None or a float width.
    ``channel_axis`` is the weight's output-channel axis (1 for a transposed convolution).

    Example:
        >>> weight_bytes(torch.zeros(4, 8), LayerQuant(bits=4))  # 32 codes x 4 bits + 4 scales x 4 B
        32.0
    """
    if spec is None or spec.is_float:
        bits = FLOAT_BITS if spec is None else spec.bits
        return weight.numel() * bits / 8
    k = n_scales(weight, spec, channel_axis)
    return weight.numel() * spec.bits / 8 + k * 4 + (0 if spec.symmetric else k)


def model_bytes(model: nn.Module, plan: Plan | None = None) -> float:
    """Bytes of the whole model at ``plan``'s bit-widths: quantized weights packed, everything else
    (biases, norms, buffers, unquantized layers) at its own dtype's size, plus 8 bytes per quantized
    activation (its scale and zero point). The layers are those :func:`squeezer.quantize` sees
    (``nn.MultiheadAttention`` split into Linears, see :func:`squeezer.graph.split_attention`)."""
    model = split_attention(model)
    layers = quantizable_layers(model)
    specs = dict(plan.layers) if plan else {}
    total = 0.0
    quantized = {f"{fqn}.weight" for fqn, s in specs.items() if fqn in layers}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in quantized:
            continue
        total += t.numel() * t.element_size()
    for fqn, spec in specs.items():
        if fqn in layers:
            m = layers[fqn]
            total += weight_bytes(m.weight, spec, weight_channel_axis(m))
            if spec.act_bits is not None and not isinstance(layers[fqn], nn.Embedding):
                total += 8
    return total


@dataclass(frozen=True)
class LayerProfile:
    """Shape facts of one quantizable layer, per sample."""

    fqn: str
    type: str
    params: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def profile_layers(model: nn.Module, example: Any) -> dict[str, LayerProfile]:
    """Per-layer weight parameters and MACs per sample, from one forward pass of ``example``.

    Linear: (outputs / out_features) × in × out. Conv: output elements × (in/groups) × kernel size.
    Transposed conv: input elements × (out/groups) × kernel size (every input value meets every
    tap of its group's kernels, including products that output padding/cropping then discards).
    Embedding: 0 MACs (a lookup). Layers the example does not reach count 0 MACs.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> {k: v.macs for k, v in profile_layers(net, torch.zeros(5, 3)).items()}
        {'0': 12, '2': 8}
    """
    model = split_attention(model)  # the layers quantize() sees
    layers = quantizable_layers(model)
    macs: dict[str, int] = {k: 0 for k in layers}
    bs = {"n": 1}

    def hook(fqn: str):
        def fn(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Linear):
                macs[fqn] += out.numel() // mod.out_features * mod.in_features * mod.out_features
            elif isinstance(mod, nn.Conv1d | nn.Conv2d):
                k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
                macs[fqn] += out.numel() * k
            elif isinstance(mod, nn.ConvTranspose1d | nn.ConvTranspose2d):
                k = math.prod(mod.kernel_size) * (mod.out_channels // mod.groups)
                macs[fqn] += inp[0].numel() * k

        return fn

    handles = [m.register_forward_hook(hook(fqn)) for fqn, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        from .data import batch_size

        bs["n"] = batch_size(example)
        forward(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        fqn: LayerProfile(fqn, layer_type(m), m.weight.numel(), macs[fqn] // bs["n"])
        for fqn, m in layers.items()
    }


def bops(profiles: Mapping[str, LayerProfile], plan: Plan | None = None) -> dict[str, float]:
    """Bit operations per sample, per layer: MACs × weight bits × activation bits."""
    specs = dict(plan.layers) if plan else {}
    out = {}
    for fqn, p in profiles.items():
        s = specs.get(fqn)
        wb = FLOAT_BITS if s is None or s.is_float else s.bits
        ab = FLOAT_BITS if s is None or s.act_bits is None else s.act_bits
        out[fqn] = float(p.macs) * wb * ab
    return out


def average_bits(model: nn.Module, plan: Plan) -> float:
    """Parameter-weighted average weight bits over the plan's quantized layers (32 for float ones)."""
    layers = quantizable_layers(split_attention(model))
    num = den = 0.0
    for fqn, spec in plan.layers.items():
        n = layers[fqn].weight.numel()
        num += n * (FLOAT_BITS if spec.is_float else spec.bits)
        den += n
    return num / den if den else float(FLOAT_BITS)


@dataclass(frozen=True)
class Latency:
    """Latency statistics in milliseconds over ``runs`` timed calls after ``warmup`` calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    warmup: int
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_calls(
    calls: Mapping[str, Callable[[], Any]], *, warmup: int = 5, runs: int = 30, batch: int = 1
) -> dict[str, Latency]:
    """Latency of each ``calls[name]()``: ``warmup`` untimed calls of each, then ``runs`` timed
    rounds that call every entry once in turn, so a change in machine load hits all alike. The one
    timing function of squeezer: everything that reports a latency measures through it.

    Example:
        >>> t = time_calls({"noop": lambda: None}, warmup=1, runs=3)
        >>> t["noop"].runs
        3
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = Latency(statistics.median(ts), q[0], q[-1], runs, warmup, batch)
    return out


@torch.no_grad()
def latency(model: nn.Module, example: Any, *, warmup: int = 5, runs: int = 30) -> Latency:
    """CPU latency of ``model(example)`` in eval mode (restored afterwards)."""
    from .data import batch_size

    was_training = model.training
    model.eval()
    try:
        call = {"model": lambda: forward(model, example)}
        return time_calls(call, warmup=warmup, runs=runs, batch=batch_size(example))["model"]
    finally:
        model.train(was_training)
