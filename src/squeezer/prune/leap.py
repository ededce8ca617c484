"""LEAP: learnable pruning thresholds tied to a target ratio (Yao et al., arXiv:2105.14636).

Every prunable layer ``l`` gets a learnable threshold ``T_l``; during training its weights are
used through a soft mask ``σ((s − T_l)/τ)``, where ``s`` is a weight's magnitude
(``target="weights"``, unstructured). With ``target="macs"`` or ``"params"`` the granularity is
structured (:mod:`squeezer.prune.leap_structured`): the scores are those of the dependency graph's
channels and whole channels go. LEAP's hybrid form is not built. The
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

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data import Dataset
from ..graph import quantizable_layers
from .base import Pruned, PruneSpec
from .leap_structured import prune_leap_channels
from .thresholds import DEFAULTS, Thresholded, check_options, density_factor, train_thresholds
from .unstructured import apply_masks, fold_stats, prunable_weights

__all__ = ["DEFAULTS", "LeapModel", "prune_leap"]


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


class LeapModel(Thresholded):
    """The model being trained: its prunable weights softly masked by learnable thresholds.

    ``T_l = scale_l · exp(speed · θ_l)``: ``scale_l`` is the layer's mean magnitude and ``speed``
    (by default ``8/(lr·steps)``) lets the thresholds travel by up to e⁸ within the fine-tuning
    however short it is (an Adam step moves ``θ`` by about ``lr``), while the weights move
    only a little.
    """

    def __init__(self, model: nn.Module, spec: PruneSpec, total_steps: int, opts: dict) -> None:
        super().__init__(model, spec, total_steps, opts)
        self.layers = list(prunable_weights(self.model, spec.skip))
        self.keys = {fqn: fqn.replace(".", "__") for fqn in self.layers}
        self.kept: dict[str, torch.Tensor] = {}
        layers = quantizable_layers(self.model)
        self.scale = {k: float(layers[f].weight.detach().abs().mean()) or 1.0
                      for f, k in self.keys.items()}  # fmt: skip
        self.count = {k: layers[f].weight.numel() for f, k in self.keys.items()}
        # start at a threshold of a tenth of the mean magnitude: almost nothing masked yet
        init = math.log(0.1) / self.opts["threshold_speed"]
        self.theta = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(init)) for k in self.keys.values()}
        )
        for fqn, k in self.keys.items():
            parametrize.register_parametrization(layers[fqn], "weight", _SoftMask(self, k))
        self.kept.clear()  # registration evaluates each mask once

    def threshold(self, key: str) -> torch.Tensor:
        return self.scale[key] * torch.exp(self.opts["threshold_speed"] * self.theta[key])

    def soft_mask(self, key: str, score: torch.Tensor) -> torch.Tensor:
        return self.mask(score, self.threshold(key), self.scale[key])

    @torch.no_grad()
    def hard_masks(self, factor: float = 1.0) -> dict[str, torch.Tensor]:
        get = self.model.get_submodule
        return {f: get(f).parametrizations.weight.original.abs() > factor * self.threshold(k)
                for f, k in self.keys.items()}  # fmt: skip

    def hard_density(self, factor: float = 1.0) -> float:
        masks = self.hard_masks(factor)
        return sum(int(m.sum()) for m in masks.values()) / sum(self.count.values())

    def prepare(self) -> None:
        self.kept.clear()

    def soft_density(self) -> torch.Tensor:
        kept, self.kept = self.kept, {}  # hold no graph past the call (the trainer copies us)
        return sum(kept.values()) / sum(self.count.values())


def prune_leap(model: nn.Module, spec: PruneSpec, data: Dataset | None = None) -> Pruned:
    """LEAP pruning of ``spec.ratio`` of the weights (``target="weights"``: unstructured), or of
    the MACs or parameters (``"macs"``, ``"params"``: whole channels,
    :func:`~squeezer.prune.leap_structured.prune_leap_channels`), trained on ``data``.

    ``spec.options`` may set ``epochs``, ``lr``, ``lambda0``, ``tau0``, ``tau1``,
    ``threshold_speed`` (or ``travel``: ``ln`` of how far a threshold may move), ``tol`` and
    ``batch_size`` (:data:`DEFAULTS`; for channels
    :data:`~squeezer.prune.leap_structured.CHANNEL_DEFAULTS`).

    Example:
        >>> spec = PruneSpec("leap", 0.7, target="weights")
        >>> p = prune_leap(net, spec, load_data("digits"))  # doctest: +SKIP
    """
    if spec.target != "weights":
        return prune_leap_channels(model, spec, data)
    opts = check_options(spec, data)
    trained, r = train_thresholds(LeapModel, model, spec, data, opts)
    learned = 1.0 - trained.hard_density()
    factor = 1.0
    if abs(learned - spec.ratio) > opts["tol"]:
        factor = density_factor(trained, 1.0 - spec.ratio)
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
