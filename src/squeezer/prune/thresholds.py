"""What LEAP's two granularities share (:mod:`squeezer.prune.leap`: weights;
:mod:`squeezer.prune.leap_structured`: channels): the options, the model wrapper with its
temperature schedule, soft/hard masks and target-ratio regulariser, the training by squeezer's one
trainer, and the common factor on the thresholds that lands the hard masks on the target."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..data import Dataset
from ..errors import ConfigError
from ..graph import copy_model
from .base import PruneSpec

#: Defaults of ``PruneSpec.options`` for LEAP.
DEFAULTS = {"epochs": 10, "lr": 1e-3, "lambda0": 200.0, "lambda_floor": 0.1, "hard_from": 1.0,
            "tau0": 0.3, "tau1": 0.005, "threshold_speed": None, "travel": 8.0, "tol": 0.005,
            "batch_size": 64}  # fmt: skip


class _Penalty(torch.autograd.Function):
    """``y`` unchanged; in backward, ``reg`` receives gradient 1, as if ``reg`` were added to the
    loss (the trainer's loss stays the task loss)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=grad.dtype)


class Thresholded(nn.Module):
    """What both granularities share: a copy of the model, the schedule (``step``, the
    temperature :meth:`tau`), the soft/hard mask of a score against a threshold, and LEAP's
    regulariser, attached in :meth:`forward`. A subclass computes its masks in :meth:`prepare`
    (before the model runs) and gives the densities (:meth:`soft_density` of the call,
    :meth:`hard_density`)."""

    def __init__(self, model: nn.Module, spec: PruneSpec, total_steps: int, opts: dict) -> None:
        super().__init__()
        self.model = copy_model(model)
        self.target = 1.0 - spec.ratio
        self.total_steps = max(total_steps, 1)
        if opts["threshold_speed"] is None:  # room for e^travel over the (cosine) schedule
            speed = opts["travel"] / (opts["lr"] * self.total_steps)
            opts = {**opts, "threshold_speed": speed}
        self.opts = opts
        self.step = 0

    def tau(self) -> float:
        t0, t1 = self.opts["tau0"], self.opts["tau1"]
        return t0 * (t1 / t0) ** min(self.step / self.total_steps, 1.0)

    def mask(
        self, score: torch.Tensor, t: torch.Tensor, unit: float | torch.Tensor
    ) -> torch.Tensor:
        """The soft mask ``σ((score − t)/(τ·unit))`` while training starts; in the last
        ``1 - hard_from`` of the steps (and in evaluation) the hard mask in the forward pass with
        the soft mask's gradient (straight through), so the weights adapt to the mask they will
        have."""
        soft = torch.sigmoid((score - t) / (self.tau() * unit))
        if torch.is_grad_enabled() and self.step < self.opts["hard_from"] * self.total_steps:
            return soft
        hard = (score > t).to(score.dtype)
        return hard + soft - soft.detach()

    def prepare(self) -> None:
        """Compute what the masks of this call need (nothing for per-weight masks)."""

    def soft_density(self) -> torch.Tensor:
        raise NotImplementedError

    def hard_density(self, factor: float = 1.0) -> float:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.prepare()
        y = self.model(*args, **kwargs)
        soft = self.soft_density()
        if not torch.is_grad_enabled():  # evaluation: no regulariser, no schedule step
            return y
        gap = abs(self.hard_density() - self.target) / self.target
        lam = self.opts["lambda0"] * max(gap, self.opts["lambda_floor"])
        reg = lam * (soft - self.target) ** 2 / self.target**2
        self.step += 1
        return _Penalty.apply(y, reg)


def density_factor(leap: Thresholded, target: float) -> float:
    """The common factor on every threshold whose hard density is ``target`` (bisection; the
    density falls as the factor grows)."""
    lo, hi = 0.0, 1.0
    while leap.hard_density(hi) > target and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if leap.hard_density(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def check_options(
    spec: PruneSpec, data: Dataset | None, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``spec.options`` over ``defaults`` (:data:`DEFAULTS` by default), after the checks both
    granularities make."""
    if data is None:
        raise ConfigError("LEAP learns its thresholds by training: it needs --data")
    unknown = set(spec.options) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown LEAP options {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    return {**(defaults or DEFAULTS), **spec.options}


def train_thresholds(
    make: Any, model: nn.Module, spec: PruneSpec, data: Dataset, opts: dict[str, Any]
) -> tuple[Thresholded, Any]:
    """Train ``make(model, spec, total_steps, opts)`` (a :class:`Thresholded`) with the one
    trainer, distilled from ``model``. Returns (the trained wrapper, the trainer's result)."""
    from ..train.finetune import finetune

    val_fraction = 0.1
    per_epoch = math.ceil(data.n_train * (1 - val_fraction) / opts["batch_size"])
    leap = make(model, spec, int(opts["epochs"]) * per_epoch, opts)
    r = finetune(
        leap, data, teacher=model, epochs=int(opts["epochs"]), lr=opts["lr"],
        batch_size=int(opts["batch_size"]), freeze_bn=False, restore_best=False,
        val_fraction=val_fraction, seed=spec.seed, progress=False,
    )  # fmt: skip
    return r.model, r
