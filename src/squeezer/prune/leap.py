"""LEAP: learnable pruning thresholds tied to a target ratio (Yao et al., arXiv:2105.14636).

Every prunable layer ``l`` gets a learnable threshold ``T_l``; during training its weights are
used through a soft mask ``σ((s − T_l)/τ)``, where ``s`` is a weight's magnitude. Only the
unstructured granularity is built; LEAP's structured and hybrid forms are not (yet). The
temperature ``τ`` (relative to each layer's mean score) decays geometrically from ``tau0`` to
``tau1``, so the soft masks harden as training goes. Option ``hard_from`` < 1 switches the forward pass to
the hard mask (soft gradient, straight through) for the last steps; off by default: it did not
cure the known weakness, that weights trained under soft masks can lose much when the masks are
made hard at high ratios with few steps (digits CNN, 90%, 4 epochs: 96% soft, ~20% hard).
The loss is the task loss (distilled from the unpruned model) plus LEAP's regulariser that ties
the thresholds to the target directly,
``λ·(d(T) − d*)²/d*²`` with ``d(T)`` the soft density (the kept fraction of the weights) and
``d*`` the target density; its coefficient is adaptive,
``λ = λ₀·max(|d_hard − d*|/d*, floor)`` (large while the hard density is far from the target,
down to ``λ₀·floor`` near it, so the task loss mostly shapes the last steps) — our reading of the
paper's adaptive coefficient; λ₀ = 200 and floor 0.1 were chosen on MNIST-1D (they reached 70%
and 90% within 1% where λ₀ = 20 without a floor stopped 3% short).

Training is :func:`squeezer.train.finetune.finetune`, the one trainer: the thresholds are
parameters of the model it trains, and the regulariser reaches them through the model's output
(:class:`_Penalty`, an identity whose backward adds the regulariser's gradient), so no loss of
its own is needed. At the end the masks are made hard (``s > T_l``); if the learned density misses
the target by more than ``tol``, all thresholds are scaled by one common factor (bisected) until
it does not, and both ratios are reported. The result is a plain model: zeros folded into the
weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data import Dataset
from ..errors import ConfigError
from ..graph import copy_model, quantizable_layers
from .base import Pruned, PruneSpec
from .unstructured import apply_masks, fold_stats, prunable_weights

#: Defaults of ``PruneSpec.options`` for LEAP.
DEFAULTS = {"epochs": 10, "lr": 1e-3, "lambda0": 200.0, "lambda_floor": 0.1, "hard_from": 1.0,
            "tau0": 0.3, "tau1": 0.005, "threshold_speed": None, "tol": 0.005, "batch_size": 64}  # fmt: skip


class _Penalty(torch.autograd.Function):
    """``y`` unchanged; in backward, ``reg`` receives gradient 1, as if ``reg`` were added to the
    loss (the trainer's loss stays the task loss)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=grad.dtype)


class _SoftMask(nn.Module):
    """The parametrization ``w ↦ w·σ((|w| − T)/τ)`` of one layer's weight (unstructured)."""

    def __init__(self, leap: LeapModel, key: str) -> None:
        super().__init__()
        self.__dict__["leap"] = leap  # not a sub-module: no cycle in the module tree
        self.key = key

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.leap.soft_mask(self.key, w.abs())
        self.leap.kept[self.key] = m.sum()
        return w * m


class LeapModel(nn.Module):
    """The model being trained: its prunable weights softly masked by learnable thresholds.

    ``T_l = scale_l · exp(speed · θ_l)``: ``scale_l`` is the layer's mean magnitude and ``speed``
    (by default ``8/(lr·steps)``) lets the thresholds travel by up to e⁸ within the fine-tuning
    however short it is (an Adam step moves ``θ`` by about ``lr``), while the weights move
    only a little.
    """

    def __init__(self, model: nn.Module, spec: PruneSpec, total_steps: int, opts: dict) -> None:
        super().__init__()
        self.model = copy_model(model)
        self.layers = list(prunable_weights(self.model, spec.skip))
        self.keys = {fqn: fqn.replace(".", "__") for fqn in self.layers}
        self.target = 1.0 - spec.ratio
        self.total_steps = max(total_steps, 1)
        if opts["threshold_speed"] is None:  # room for e^8 of travel over the (cosine) schedule
            opts = {**opts, "threshold_speed": 8.0 / (opts["lr"] * self.total_steps)}
        self.opts = opts
        self.step = 0
        self.kept: dict[str, torch.Tensor] = {}
        layers = quantizable_layers(self.model)
        self.scale = {k: float(layers[f].weight.detach().abs().mean()) or 1.0
                      for f, k in self.keys.items()}  # fmt: skip
        self.count = {k: layers[f].weight.numel() for f, k in self.keys.items()}
        # start at a threshold of a tenth of the mean magnitude: almost nothing masked yet
        init = math.log(0.1) / opts["threshold_speed"]
        self.theta = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(init)) for k in self.keys.values()}
        )
        for fqn, k in self.keys.items():
            parametrize.register_parametrization(layers[fqn], "weight", _SoftMask(self, k))
        self.kept.clear()  # registration evaluates each mask once

    def threshold(self, key: str) -> torch.Tensor:
        return self.scale[key] * torch.exp(self.opts["threshold_speed"] * self.theta[key])

    def tau(self) -> float:
        t0, t1 = self.opts["tau0"], self.opts["tau1"]
        return t0 * (t1 / t0) ** min(self.step / self.total_steps, 1.0)

    def soft_mask(self, key: str, score: torch.Tensor) -> torch.Tensor:
        """The soft mask while training starts; in the last ``1 - hard_from`` of the steps (and
        in evaluation) the hard mask in the forward pass with the soft mask's gradient (straight
        through), so the weights adapt to the mask they will have."""
        t = self.threshold(key)
        soft = torch.sigmoid((score - t) / (self.tau() * self.scale[key]))
        if torch.is_grad_enabled() and self.step < self.opts["hard_from"] * self.total_steps:
            return soft
        hard = (score > t).to(score.dtype)
        return hard + soft - soft.detach()

    @torch.no_grad()
    def hard_masks(self, factor: float = 1.0) -> dict[str, torch.Tensor]:
        get = self.model.get_submodule
        return {f: get(f).parametrizations.weight.original.abs() > factor * self.threshold(k)
                for f, k in self.keys.items()}  # fmt: skip

    def hard_density(self, factor: float = 1.0) -> float:
        masks = self.hard_masks(factor)
        return sum(int(m.sum()) for m in masks.values()) / sum(self.count.values())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.kept.clear()
        y = self.model(*args, **kwargs)
        kept, self.kept = self.kept, {}  # hold no graph past the call (the trainer copies us)
        if not torch.is_grad_enabled():  # evaluation: no regulariser, no schedule step
            return y
        soft = sum(kept.values()) / sum(self.count.values())
        gap = abs(self.hard_density() - self.target) / self.target
        lam = self.opts["lambda0"] * max(gap, self.opts["lambda_floor"])
        reg = lam * (soft - self.target) ** 2 / self.target**2
        self.step += 1
        return _Penalty.apply(y, reg)


def _density_factor(leap: LeapModel, target: float) -> float:
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


def prune_leap(model: nn.Module, spec: PruneSpec, data: Dataset | None = None) -> Pruned:
    """LEAP unstructured pruning of ``spec.ratio`` of the weights, trained on ``data``.

    ``spec.options`` may set ``epochs``, ``lr``, ``lambda0``, ``tau0``, ``tau1``,
    ``threshold_speed``, ``tol`` and ``batch_size`` (:data:`DEFAULTS`).

    Example:
        >>> spec = PruneSpec("leap", 0.7, target="weights")
        >>> p = prune_leap(net, spec, load_data("digits"))  # doctest: +SKIP
    """
    if data is None:
        raise ConfigError("LEAP learns its thresholds by training: it needs --data")
    if spec.target != "weights":
        raise ConfigError("LEAP here prunes weights (target='weights', --prune-target weights)")
    unknown = set(spec.options) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown LEAP options {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **spec.options}
    from ..train.finetune import finetune

    val_fraction = 0.1
    per_epoch = math.ceil(data.n_train * (1 - val_fraction) / opts["batch_size"])
    leap = LeapModel(model, spec, int(opts["epochs"]) * per_epoch, opts)
    r = finetune(
        leap, data, teacher=model, epochs=int(opts["epochs"]), lr=opts["lr"],
        batch_size=int(opts["batch_size"]), freeze_bn=False, restore_best=False,
        val_fraction=val_fraction, seed=spec.seed, progress=False,
    )  # fmt: skip
    trained: LeapModel = r.model
    learned = 1.0 - trained.hard_density()
    factor = 1.0
    if abs(learned - spec.ratio) > opts["tol"]:
        factor = _density_factor(trained, 1.0 - spec.ratio)
    masks = trained.hard_masks(factor)
    plain = trained.model
    for fqn in trained.layers:  # the trained weights, without the soft masks
        parametrize.remove_parametrizations(
            plain.get_submodule(fqn), "weight", leave_parametrized=False
        )
    ratios, stats = fold_stats(plain, masks)
    stats.update(learned_ratio=learned, threshold_factor=factor, epochs=opts["epochs"],
                 final_val_metric=r.history[-1]["val_metric"])  # fmt: skip
    return Pruned(apply_masks(plain, masks).eval(), spec, ratios, {}, stats)
