"""Adaptive batch size driven by the Hessian's top eigenvalue (ABS).

Yao, Gholami et al., "Large batch size training of neural networks with adversarial training and
second-order information" (arXiv:1810.01021): large batches hurt early in training, where the loss
is sharp (large top Hessian eigenvalue λ), and cost little once it is flat. ABS therefore starts
with a small batch and, once an epoch, measures λ on one fixed batch; when λ has fallen by a factor
``decrease`` below its largest value since the last growth (or ``patience`` measurements passed
without that), the batch
grows by ``growth`` (up to ``max_batch_size``) and the learning rate is scaled with it (linearly by
default, the rule the paper pairs with batch growth; ``lr_scaling="sqrt"`` or ``"none"`` too).
Learning-rate decay at ``decay_epochs`` multiplies the rate by ``decay``.

The effective batch grows by gradient accumulation over micro-batches of the initial size, so
memory stays that of the small batch and a run with ``max_batch_size=batch_size`` is exactly the
fixed-batch baseline. λ comes from squeezer's engine: :class:`~squeezer.hvp.HessianOperator` on
the batch and :func:`~squeezer.estimators.top_eigen` (Lanczos), seeded per epoch.

Example:
    >>> from squeezer.zoo import create
    >>> from squeezer.data import load_data
    >>> net, run = fit_abs(create("digits_cnn"), load_data("digits"), epochs=2)  # doctest: +SKIP
    >>> [e.batch_size for e in run.epochs]  # doctest: +SKIP
    [32, 64]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import Dataset, evaluate, forward
from ..data import batch_size as count_samples
from ..errors import ConfigError
from ..graph import copy_model
from ..progress import progress
from .optim import make_optimizer

LR_SCALING = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of an ABS run: the eigenvalue measured before it (None when the batch is fixed)
    and the effective batch, learning rate, optimizer steps and mean training loss of the epoch."""

    epoch: int
    eigenvalue: float | None
    batch_size: int
    lr: float
    steps: int
    loss: float


@dataclass(frozen=True)
class ABSRun:
    """The trace of :func:`fit_abs`: per-epoch records, total optimizer steps, the test metric."""

    epochs: tuple[EpochRecord, ...]
    steps: int
    metric_name: str
    metric: float
    version: int = 1
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def eigenvalues(self) -> tuple[float | None, ...]:
        return tuple(e.eigenvalue for e in self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ABSRun:
        return cls(**{**d, "epochs": tuple(EpochRecord(**e) for e in d["epochs"])})


def top_eigenvalue(
    model: nn.Module, loss_fn: Any, batch: tuple[Any, Any], *, seed: int = 0, max_iter: int = 20
) -> float:
    """The top Hessian eigenvalue of ``loss_fn`` on one batch (the model is not modified).

    Example:
        >>> net = nn.Linear(3, 1, bias=False)
        >>> x = torch.eye(3) * torch.tensor([1.0, 2.0, 3.0])[:, None]
        >>> round(top_eigenvalue(net, nn.functional.mse_loss, (x, torch.zeros(3, 1))), 3)
        6.0
    """
    from ..estimators import top_eigen
    from ..hvp import HessianOperator

    op = HessianOperator(model, loss_fn, batch)
    eig = top_eigen(
        op, 1, rtol=1e-2, max_iter=max_iter, generator=torch.Generator().manual_seed(seed)
    )
    return float(eig.values[0])


def fit_abs(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 20,
    batch_size: int = 32,
    max_batch_size: int = 1024,
    growth: int = 2,
    decrease: float = 2.0,
    patience: int = 10,
    lr: float | None = None,
    lr_scaling: str = "linear",
    decay_epochs: tuple[int, ...] = (),
    decay: float = 0.1,
    optimizer: str = "sgd",
    weight_decay: float = 1e-4,
    eig_batch_size: int = 256,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[nn.Module, ABSRun]:
    """Train a copy of ``model`` with the batch grown by the Hessian's top eigenvalue.

    Args:
        model: the network (not modified).
        data: the data set; training on its train split, the metric on its test split.
        epochs: passes over the training split.
        batch_size: the initial (and micro-) batch size.
        max_batch_size: the largest effective batch; equal to ``batch_size`` for a fixed batch.
        growth: factor by which the batch grows.
        decrease: grow when λ falls below ``λ_ref / decrease`` (``λ_ref``: the largest λ measured
            since the last growth, starting with the λ measured at it).
        patience: grow anyway after this many measurements without such a fall (the paper's
            duration factor).
        lr: the initial learning rate (default: the optimizer's, see
            :data:`~squeezer.train.optim.OPTIMIZERS`).
        lr_scaling: how the rate follows the batch: ``"linear"``, ``"sqrt"`` or ``"none"``.
        decay_epochs: epochs at whose start the rate is multiplied by ``decay``.
        optimizer: ``"sgd"`` (default), ``"lamb"``, ``"lars"`` or ``"adamw"``.
        eig_batch_size: samples of the fixed (seeded) batch on which λ is measured.
        seed: initialisation, shuffling and the eigen-solver's start vectors.

    Returns:
        The trained copy and an :class:`ABSRun` (eigenvalue trace, batch sizes, steps, metric).
    """
    if batch_size < 1 or max_batch_size < batch_size:
        raise ConfigError(
            f"batch sizes must satisfy 1 <= batch_size <= max_batch_size; got {batch_size} and "
            f"{max_batch_size}"
        )
    if growth < 2 or decrease <= 1 or patience < 1:
        raise ConfigError("use growth >= 2, decrease > 1 and patience >= 1")
    if lr_scaling not in LR_SCALING:
        raise ConfigError(f"unknown lr_scaling {lr_scaling!r}; use one of {LR_SCALING}")
    torch.manual_seed(seed)
    net = copy_model(model)
    net.train()
    opt = make_optimizer(optimizer, net, lr=lr, weight_decay=weight_decay)
    base_lr = opt.param_groups[0]["lr"]
    loss_fn = data.task.loss
    eig_batch = next(iter(data.train_batches(eig_batch_size, shuffle=True, seed=seed + 10_007)))
    micro = data.train_batches(batch_size, shuffle=True, seed=seed)
    adaptive = max_batch_size > batch_size

    effective, reference, waited, steps, rate_decay = batch_size, math.inf, 0, 0, 1.0
    records: list[EpochRecord] = []
    with progress(total=epochs, desc="abs", unit="epoch", enabled=show_progress) as bar:
        for epoch in range(epochs):
            if epoch in decay_epochs:
                rate_decay *= decay
            lam: float | None = None
            if adaptive:
                lam = top_eigenvalue(net, loss_fn, eig_batch, seed=seed + epoch)
                waited += 1
                if epoch == 0:
                    reference, waited = lam, 0
                elif lam < reference / decrease or waited >= patience:
                    effective = min(effective * growth, max_batch_size)
                    reference, waited = lam, 0
                else:  # early in training λ rises: measure the fall from the peak
                    reference = max(reference, lam)
            ratio = effective / batch_size
            scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[lr_scaling]
            rate = base_lr * scale * rate_decay
            for group in opt.param_groups:
                group["lr"] = rate
            k = effective // batch_size
            epoch_steps, total, count = 0, 0.0, 0
            pending = 0
            opt.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(micro):
                n = count_samples(x)
                loss = loss_fn(forward(net, x), y)
                (loss * n).backward()  # summed; divided by the group's samples before the step
                total, count, pending = total + float(loss.detach()) * n, count + n, pending + n
                if (i + 1) % k == 0 or i + 1 == len(micro):
                    for p in net.parameters():
                        if p.grad is not None:
                            p.grad.div_(pending)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    epoch_steps, pending = epoch_steps + 1, 0
            steps += epoch_steps
            records.append(EpochRecord(epoch, lam, effective, rate, epoch_steps, total / count))
            bar.set_postfix(batch=effective, eig="-" if lam is None else f"{lam:.3g}")
            bar.update(1)
    net.eval()
    metric = evaluate(net, data.test_batches(), data.task)
    config = dict(
        epochs=epochs, batch_size=batch_size, max_batch_size=max_batch_size, growth=growth,
        decrease=decrease, patience=patience, lr=base_lr, lr_scaling=lr_scaling,
        decay_epochs=list(decay_epochs), decay=decay, optimizer=optimizer, seed=seed,
    )  # fmt: skip
    return net, ABSRun(tuple(records), steps, data.task.metric_name, metric, config=config)
