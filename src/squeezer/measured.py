"""Measured loss changes, the ground truth the second-order estimates are checked against: the
mean loss of a model with some of its weights replaced (:func:`forward_with`, :func:`mean_loss`,
through ``torch.func.functional_call``, so the model itself is never touched), and the loss
increase when only one layer's *input activations* are fake-quantized
(:func:`activation_sensitivity`). The ``"measured"`` and ``"kl"`` sensitivity methods use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data import batch_size, forward, to_device
from .errors import ConfigError
from .graph import copy_model, model_device, quantizable_layers
from .quant.primitives import fake_quantize, observe

LossFn = Callable[[Any, Any], torch.Tensor]


@torch.no_grad()
def forward_with(
    model: nn.Module, inputs: Any, overrides: Mapping[str, torch.Tensor] | None = None
) -> Any:
    """``model(inputs)`` with some parameters replaced (``{"fc.weight": tensor}``), without
    touching the model's own parameters (``torch.func.functional_call``)."""
    if not overrides:
        return forward(model, inputs)
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(overrides), args=(), kwargs=dict(inputs), strict=False)
    return functional_call(model, dict(overrides), args=(inputs,), strict=False)


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn,
    overrides: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Sample-weighted mean of ``loss_fn`` over ``(inputs, targets)`` batches."""
    device = model_device(model)
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = _split(batch)
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        n = batch_size(inputs)
        total += float(loss_fn(forward_with(model, inputs, overrides), targets)) * n
        count += n
    return total / max(count, 1)


def _cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    return F.cross_entropy(logits, targets)


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        "sensitivity data must be batches of (inputs, targets); e.g. [(x[:256], y[:256])]"
    )


def _require_data(batches: Sequence[Any] | None, what: str) -> Sequence[Any]:
    if not batches:
        raise ConfigError(f"{what} needs data: pass data=[(inputs, targets), ...]")
    return batches


def _eval_copy(model: nn.Module) -> nn.Module:
    net = copy_model(model)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def activation_sensitivity(
    model: nn.Module,
    data: Iterable[Any],
    *,
    bits: Sequence[int] = (2, 3, 4, 8),
    loss_fn: LossFn | None = None,
    layers: Sequence[str] | None = None,
    percentile: float = 99.99,
) -> dict[str, dict[int, float]]:
    """Measured loss increase when only layer i's *input* is fake-quantized to b bits.

    The range of each layer's input is fixed first, from the float model on ``data`` (per tensor,
    asymmetric, clipped at ``percentile``), as static quantization would calibrate it.
    Embedding layers (integer inputs) are skipped.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> g = torch.Generator().manual_seed(0)
        >>> batches = [(torch.randn(32, 4, generator=g), torch.randint(3, (32,), generator=g))]
        >>> a = activation_sensitivity(net, batches, bits=(2, 8))
        >>> sorted(a), sorted(a["2"])
        (['0', '2'], [2, 8])
    """
    batches = list(data)
    net = _eval_copy(model)
    loss_fn = loss_fn or _cross_entropy
    qlayers = quantizable_layers(net)
    names = [k for k in (layers or list(qlayers)) if not isinstance(qlayers[k], nn.Embedding)]
    # One calibration pass records every layer's input sample.
    samples: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    gen = torch.Generator().manual_seed(0)

    def recorder(fqn: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            flat = args[0].detach().float().reshape(-1)
            if flat.numel() > 65536:  # extremes kept exactly, the rest subsampled for percentiles
                idx = torch.randint(flat.numel(), (65536,), generator=gen, device=flat.device)
                flat = torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])
            samples[fqn].append(flat.cpu())

        return hook

    handles = [qlayers[k].register_forward_pre_hook(recorder(k)) for k in names]
    try:
        base = mean_loss(net, batches, loss_fn)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[int, float]] = {}
    for fqn in names:
        xs = torch.cat(samples[fqn]).reshape(1, 1, -1)
        row = {}
        for b in bits:
            qp = observe(xs, b, False, "percentile", percentile)
            scale, zp = qp.scale.reshape(()), qp.zero_point.reshape(())
            qp = type(qp)(scale, zp, qp.qmin, qp.qmax)

            def fq(_m: nn.Module, args: tuple[Any, ...], qp: Any = qp) -> tuple[Any, ...]:
                return (fake_quantize(args[0], qp), *args[1:])

            h = qlayers[fqn].register_forward_pre_hook(fq)
            try:
                row[b] = mean_loss(net, batches, loss_fn) - base
            finally:
                h.remove()
        out[fqn] = row
    return out
