"""Data-free quantization: ZeroQ distilled data (Cai et al., "ZeroQ: A Novel Zero Shot Quantization
Framework", CVPR 2020, arXiv:2001.00281).

A trained network remembers the statistics of its training data in its BatchNorm layers: each holds
the running per-channel mean and variance of the tensor that *enters* it. ZeroQ starts from random
inputs and optimises them (Adam on the inputs, weights frozen) until the per-channel mean and
standard deviation entering every BatchNorm layer match that layer's running mean and
sqrt(running variance). The result, "distilled data", stands in for real data wherever squeezer
needs inputs: activation ranges (calibration) and sensitivity.

Where we differ from the paper, measured on the built-in nets (docs/benchmarks.md, "Data-free
quantization"):

- Besides ZeroQ's statistics over the whole batch (``match="batch"``, the default), which a few
  extreme inputs can satisfy while the rest stay bland, we offer matching each input's own
  per-channel statistics over its spatial positions (``match="sample"``). It gives narrower
  activation ranges: better for 4-bit activations, slightly worse for 8-bit ones.
- ZeroQ also pulls the inputs' own statistics to a standard normal (a normalised input). We start
  from a standard normal but make that prior term opt-in (``prior=(mean, std)``): for a model fed
  unnormalised inputs (digits scaled to [0, 1]) the prior fights the BatchNorm terms.

ZeroQ's sensitivity of layer i at b bits is the KL divergence between the float model's output
distribution and that of the model with only layer i's weight quantized to b bits, averaged over the
distilled inputs; it is registered as ``sensitivity(model, method="kl")``
(:mod:`squeezer.sensitivity`). Activation ranges from distilled data use percentile clipping (the
``LayerQuant`` default, ``act_observer="percentile"``), as ZeroQ advises.

The statistics are read with forward pre-hooks on the BatchNorm modules themselves, so nothing is
assumed about what precedes a BatchNorm layer (a conv, a linear layer, a residual sum, ...). Hooks
are removed in ``finally`` blocks, and all work happens on a private copy of the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import to_device
from .errors import ConfigError, UnsupportedModelError
from .graph import copy_model, model_device
from .measured import forward_with
from .progress import progress as progress_bar
from .sensitivity import SensitivityRequest, register_sensitivity

#: Message tail naming the alternative when a model cannot be distilled from.
_USE_REAL_DATA = (
    "calibrate with real data instead (--calib real --data DATA on the command line, "
    "or quantize(model, plan, calib=batches))"
)


@dataclass(frozen=True)
class Distilled:
    """Distilled inputs and how the distillation went.

    Attributes:
        inputs: the synthetic inputs, shape ``(n, *input_shape)``.
        loss_before: the loss (BatchNorm statistics as ``match`` says, plus the prior) of the
            initial random inputs (mean over chunks, weighted by chunk size).
        loss_after: the same loss of the returned inputs.
        seconds: wall-clock time of the whole distillation.
        steps: Adam steps per chunk. 200 (ZeroQ used 500) already takes the loss well below that
            of real data on the built-in digits and MNIST-1D nets; more steps only cost time.
        n_bn: number of BatchNorm layers matched.
    """

    inputs: torch.Tensor
    loss_before: float
    loss_after: float
    seconds: float
    steps: int
    n_bn: int

    def summary(self) -> str:
        """One line for logs and reports."""
        return (
            f"distilled {self.inputs.shape[0]} inputs of shape {tuple(self.inputs.shape[1:])} "
            f"matching {self.n_bn} BatchNorm layers in {self.seconds:.1f} s: "
            f"loss {self.loss_before:.4g} -> {self.loss_after:.4g}"
        )


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers (1d/2d/3d) of ``model`` that carry running statistics, keyed by FQN.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> list(batchnorm_layers(net))
        ['1']
    """
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    }


MATCHES = ("sample", "batch")


def _channel_stats(x: torch.Tensor, match: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) standard deviation of a BatchNorm input ``(N, C, ...)``.

    ``batch``: reduced over the batch and every position, as BatchNorm itself reduces; shape (C,).
    ``sample``: reduced over the positions of each sample separately; shape (N, C). An input with
    fewer than two positions per sample (a BatchNorm1d after a linear layer) has no per-sample
    spread, and falls back to ``batch``.
    """
    if match == "sample" and x.dim() > 2 and x[0, 0].numel() > 1:
        flat = x.flatten(2)
        dim = 2
    else:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        dim = 1
    mean = flat.mean(dim)
    # sqrt of a variance that can be 0 at the start has an infinite gradient: keep it off zero.
    std = (flat.var(dim, unbiased=False) + 1e-8).sqrt()
    return mean, std


class _StatsRecorder:
    """Forward pre-hooks that record the BN-statistics loss of every BatchNorm input.

    Use as a context manager: the hooks are removed on exit, whatever happens inside.
    """

    def __init__(self, bns: Sequence[nn.modules.batchnorm._BatchNorm], match: str):
        self.bns = list(bns)
        self.match = match
        self.terms: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.Module, args: tuple) -> None:
        mean, std = _channel_stats(args[0], self.match)
        ref_mean = module.running_mean.to(mean.dtype)
        ref_std = (module.running_var.to(std.dtype) + module.eps).sqrt()
        # ZeroQ's loss: squared L2 distance of the mean and std vectors, per channel (and per
        # sample, for "sample") on average; the (C,) references broadcast over samples.
        self.terms.append((mean - ref_mean).pow(2).mean() + (std - ref_std).pow(2).mean())

    def __enter__(self) -> _StatsRecorder:
        try:
            for bn in self.bns:
                self._handles.append(bn.register_forward_pre_hook(self._hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _input_prior_loss(x: torch.Tensor, prior: tuple[float, float]) -> torch.Tensor:
    """The input's own statistics against the prior (mean, std), per channel (dim 1) if the input
    has channels, else over everything."""
    mean, std = _channel_stats(x) if x.dim() > 2 else _channel_stats(x.reshape(-1, 1))
    return (mean - prior[0]).pow(2).mean() + (std - prior[1]).pow(2).mean()


def _chunks(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk optimised together. A final chunk of one input would have no
    spread to match, so it joins the chunk before."""
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        bounds.pop(-2)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _frozen_copy(model: nn.Module) -> nn.Module:
    net = copy_model(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _resolve_shape(
    model: nn.Module, input_shape: Sequence[int] | None, example: torch.Tensor | None
) -> tuple[tuple[int, ...], torch.dtype]:
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() < 1:
            raise ConfigError(
                "example must be a tensor batch of inputs, shape (batch, ...); e.g. example=x[:1]"
            )
        dtype = example.dtype if example.is_floating_point() else torch.float32
        return tuple(int(s) for s in example.shape[1:]), dtype
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ConfigError(
            "cannot tell the model's input shape; pass input_shape=(C, H, W) without the batch "
            "dimension, or example=a_batch, or give the model an `input_shape` attribute"
        )
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"input_shape must be a tuple of ints, got {shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(
            f"input_shape {shape} is not a positive shape without the batch dimension; "
            "e.g. (1, 8, 8)"
        )
    return shape, torch.float32


def _check_match(match: str) -> None:
    if match not in MATCHES:
        raise ConfigError(f"unknown match {match!r}; choose one of {', '.join(MATCHES)}")


def bn_stat_loss(model: nn.Module, inputs: torch.Tensor, *, match: str = "batch") -> float:
    """ZeroQ's BatchNorm-statistics loss of ``inputs`` (without the input prior): over every
    BatchNorm layer, the mean squared gap between the per-channel mean / std of the layer's input
    and its running mean / sqrt(running var), summed over layers. With ``match="batch"`` (ZeroQ's
    statistics over the whole batch) it is small for real data and large for noise.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> bn_stat_loss(net, torch.randn(32, 4)) >= 0
        True
    """
    net = _frozen_copy(model)
    bns = batchnorm_layers(net)
    if not bns:
        raise UnsupportedModelError(
            f"the model has no BatchNorm layer with running statistics; {_USE_REAL_DATA}"
        )
    _check_match(match)
    with torch.no_grad(), _StatsRecorder(bns.values(), match) as rec:
        net(inputs.to(model_device(net)))
    return float(sum(rec.terms))


def distill(
    model: nn.Module,
    n: int,
    *,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    example: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 0.2,
    batch_size: int = 64,
    prior: tuple[float, float] | None = None,
    match: str = "batch",
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> Distilled:
    """ZeroQ distillation with its record (losses, time); :func:`distill_data` gives only the data.

    Args:
        model: a trained model holding BatchNorm layers; never modified.
        n: number of inputs to distill.
        seed: seed of the generator that draws the initial inputs; same seed, same data.
        input_shape: input shape without the batch dimension, e.g. ``(1, 8, 8)``. Defaults to
            ``example``'s shape, else the model's ``input_shape`` attribute.
        example: an example input batch (only its shape and dtype are used).
        steps: Adam steps per chunk. 200 (ZeroQ used 500) already takes the loss well below that
            of real data on the built-in digits and MNIST-1D nets; more steps only cost time.
        lr: Adam learning rate (cosine-annealed to zero over ``steps``).
        batch_size: inputs optimised together; batch statistics are matched per chunk, so
            chunks much smaller than 32 give noisy statistics.
        prior: (mean, std) the inputs' per-channel statistics are pulled to, as ZeroQ pulls
            normalised inputs to (0, 1); None (default) for no prior term. The inputs start from
            a standard normal either way. Give a prior only if you know the model's input
            normalisation: a wrong one fights the BatchNorm terms (on digits scaled to [0, 1],
            the (0, 1) prior left the batch-statistics loss 100x higher and cost 7.6 points at
            W4A4, docs/benchmarks.md).
        match: which statistics are matched. ``"batch"`` (default): ZeroQ's statistics over the
            whole chunk. ``"sample"``: each input's own per-channel mean and std over its spatial
            positions (BatchNorm inputs without spatial positions use batch statistics), so no
            input can be an outlier that the others average out. On MNIST-1D, W4A4 calibrated on
            "sample" data beat "batch" by 4.1 points and real data by 1.8, but lost 0.3 points at
            W8A8 and 0.6 at mixed 4-bit weights with 8-bit activations (docs/benchmarks.md).
        progress: show a progress bar on stderr when it is a terminal.
        callback: called as ``callback(step, loss)`` after every step (step counts across chunks).

    Raises:
        UnsupportedModelError: the model has no BatchNorm layer with running statistics.
        ConfigError: the input shape cannot be told, or an argument is out of range.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
        >>> d = distill(net, 8, input_shape=(16,), steps=20)
        >>> d.inputs.shape, d.loss_after < d.loss_before
        (torch.Size([8, 16]), True)
    """
    if int(n) < 1:
        raise ConfigError(f"n must be a positive number of inputs, got {n}")
    if int(steps) < 1 or int(batch_size) < 2 or not lr > 0:
        raise ConfigError(
            f"need steps >= 1, batch_size >= 2 and lr > 0 (got {steps}, {batch_size}, {lr})"
        )
    _check_match(match)
    if prior is not None and not (len(prior) == 2 and prior[1] > 0):
        raise ConfigError(f"prior is (mean, std) with std > 0, got {prior!r}")
    net = _frozen_copy(model)
    bns = batchnorm_layers(net)
    if not bns:
        raise UnsupportedModelError(
            "the model has no BatchNorm layer with running statistics, so ZeroQ cannot distill "
            f"data from it; {_USE_REAL_DATA}"
        )
    shape, dtype = _resolve_shape(model, input_shape, example)
    device = model_device(net)
    gen = torch.Generator().manual_seed(int(seed))
    # All initial noise is drawn up front, so the data depends only on (seed, n, shape).
    x0 = torch.randn((int(n), *shape), generator=gen, dtype=dtype)
    chunks = _chunks(int(n), int(batch_size))

    out, before, after = [], 0.0, 0.0
    t0 = time.perf_counter()
    step = 0
    total = len(chunks) * int(steps)
    with (
        progress_bar(total=total, desc="distill", unit="step", enabled=progress) as bar,
        _StatsRecorder(bns.values(), match) as rec,
    ):

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            rec.terms.clear()
            net(x)
            loss = torch.stack(rec.terms).sum()
            if prior is not None:
                loss = loss + _input_prior_loss(x, prior)
            return loss

        for lo, hi in chunks:
            x = x0[lo:hi].clone().to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for k in range(int(steps)):
                # Cosine annealing: big moves first, then settle on the minimum.
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * k / int(steps)))
                opt.zero_grad(set_to_none=True)
                loss = loss_of(x)
                if k == 0:
                    before += float(loss.detach()) * (hi - lo)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                if callback is not None:
                    callback(step, float(loss.detach()))
            with torch.no_grad():
                after += float(loss_of(x)) * (hi - lo)
            out.append(x.detach())
    return Distilled(
        inputs=torch.cat(out).cpu(),
        loss_before=before / int(n),
        loss_after=after / int(n),
        seconds=time.perf_counter() - t0,
        steps=int(steps),
        n_bn=len(bns),
    )


def distill_data(model: nn.Module, n: int, **options: Any) -> torch.Tensor:
    """``n`` synthetic inputs whose BatchNorm statistics match the model's running statistics:
    :func:`distill` (same keyword options) without its record.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> distill_data(net, 4, input_shape=(1, 8, 8), steps=10).shape
        torch.Size([4, 1, 8, 8])
    """
    return distill(model, n, **options).inputs


# --------------------------------------------------------------------------------------------------
# Using distilled data: calibration batches, a data-free quantize, and KL sensitivity


def zeroshot_batches(
    model: nn.Module,
    n: int = 64,
    *,
    seed: int = 0,
    batch_size: int = 64,
    **distill_kwargs: Any,
) -> list[torch.Tensor]:
    """Distilled inputs split into batches: pass them as ``calib=`` to
    :func:`squeezer.quant.apply.quantize` or as ``data=`` to ``sensitivity(method="kl")``.

    This is what ``--calib zeroshot`` needs: no data at all, only the model.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> [b.shape[0] for b in zeroshot_batches(net, 9, input_shape=(1, 8, 8), batch_size=4,
        ...                                       steps=5)]
        [4, 5]
    """
    x = distill_data(model, n, seed=seed, batch_size=batch_size, **distill_kwargs)
    # The same chunking as the distillation, so each batch is one jointly optimised chunk.
    return [x[lo:hi] for lo, hi in _chunks(x.shape[0], batch_size)]


def quantize_zeroshot(
    model: nn.Module,
    config: Any,
    *,
    n: int = 64,
    seed: int = 0,
    **distill_kwargs: Any,
) -> nn.Module:
    """``quantize(model, config, calib=distilled data)``: data-free post-training quantization.

    Activation ranges come from ``n`` distilled inputs, with each layer's ``act_observer``
    (percentile clipping unless the plan says otherwise).

    Example:
        >>> from squeezer.config import LayerQuant, QuantConfig
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> q = quantize_zeroshot(net, QuantConfig(LayerQuant(8, act_bits=8)), n=8,
        ...                       input_shape=(1, 8, 8), steps=5)
        >>> type(q[0]).__name__
        'QuantConv2d'
    """
    from .quant.apply import quantize

    calib = zeroshot_batches(model, n, seed=seed, **distill_kwargs)
    return quantize(model, config, calib=calib)


def _batch_inputs(batch: Any) -> Any:
    """The inputs of an ``(inputs, targets)`` batch, or the batch itself if it is bare inputs."""
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0]
    return batch


def _log_probs(outputs: Any) -> torch.Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def kl_sensitivity_table(
    model: nn.Module,
    data: Iterable[Any],
    quantized_weights: Callable[[str, int], torch.Tensor],
    layers: Sequence[str],
    bits: Sequence[int],
) -> dict[str, dict[int, float]]:
    """ZeroQ's Ω_i(b): mean over inputs of KL(softmax(float outputs) ‖ softmax(outputs with only
    layer i's weight replaced by ``quantized_weights(i, b)``)). Float widths (≥ 16) score 0.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> t = kl_sensitivity_table(net, [torch.randn(16, 4)],
        ...                          lambda k, b: net.get_submodule(k).weight, ["0"], [4])
        >>> t["0"][4]
        0.0
    """
    net = copy_model(model).eval()
    device = model_device(net)
    inputs = [to_device(_batch_inputs(b), device) for b in data]
    if not inputs:
        raise ConfigError("KL sensitivity needs at least one batch of inputs (or none, to distill)")
    ref = [_log_probs(forward_with(net, x)) for x in inputs]
    count = sum(r.shape[0] for r in ref)
    out: dict[str, dict[int, float]] = {}
    for fqn in layers:
        row: dict[int, float] = {}
        for b in bits:
            if b >= 16:
                row[b] = 0.0
                continue
            over = {f"{fqn}.weight": quantized_weights(fqn, b)}
            total = 0.0
            for x, logp in zip(inputs, ref, strict=True):
                logq = _log_probs(forward_with(net, x, over))
                # KL(p || q) = Σ p (log p − log q), summed over classes, then over samples.
                total += float(F.kl_div(logq, logp, log_target=True, reduction="sum"))
            row[b] = total / count
        out[fqn] = row
    return out


@register_sensitivity("kl")
def _kl(req: SensitivityRequest) -> Mapping[str, Mapping[int, float]]:
    """ZeroQ's KL sensitivity on ``req.data`` (inputs only; targets are ignored), or, without data,
    on ``n`` inputs distilled from the model (options ``n``, ``seed``, ``steps``,
    ``input_shape``, ``lr``, ``prior``, ``match``)."""
    data: Iterable[Any] | None = req.data
    if not data:
        opts = dict(req.options)
        data = zeroshot_batches(
            req.model,
            int(opts.pop("n", 64)),
            seed=int(opts.pop("seed", 0)),
            **{
                k: v
                for k, v in opts.items()
                if k in ("steps", "input_shape", "lr", "prior", "match")
            },
        )
    return kl_sensitivity_table(req.model, data, req.quantized_weight, list(req.layers), req.bits)
