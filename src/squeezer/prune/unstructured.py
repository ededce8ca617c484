"""Unstructured and N:M magnitude pruning, folded into the weights.

The smallest-magnitude weights are set to zero, globally (one threshold over every layer's
weights, so layers with small weights lose more) or per layer (the same fraction in each). N:M
keeps the ``n`` largest of every ``m`` consecutive weights along a layer's input dimension (the
pattern sparse tensor cores run; Mishra et al., arXiv:2104.08378). The zeros are written into the
weights of a copy: the result carries no masks, no hooks, no reparametrisation, and is a plain
model that saves, quantizes and exports like any other.

No speed-up is claimed: dense runtimes (ONNX Runtime on CPU among them) multiply the zeros too.
Size is counted honestly by :func:`sparse_bytes`: a layer is stored sparse only where that is
smaller than dense.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data import Dataset
from ..errors import ConfigError
from ..graph import copy_model, quantizable_layers
from .base import Pruned, PruneSpec


def prunable_weights(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The Linear and Conv layers whose weights magnitude pruning zeroes (Embeddings are lookups,
    left whole), minus ``skip``."""
    layers = {k: m for k, m in quantizable_layers(model).items() if not isinstance(m, nn.Embedding)}
    unknown = [s for s in skip if s not in layers]
    if unknown:
        raise ConfigError(
            f"cannot skip {unknown[0]!r}: not a prunable layer; the layers are {', '.join(layers)}"
        )
    return {k: m for k, m in layers.items() if k not in skip}


def magnitude_masks(
    weights: dict[str, torch.Tensor], ratio: float, *, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero ``ratio`` of the weights by magnitude.

    ``scope="global"`` ranks every weight against every other; ``"layer"`` removes ``ratio`` of
    each tensor. Exactly ``round(ratio * count)`` weights go (ties broken by position).

    Example:
        >>> m = magnitude_masks({"a": torch.tensor([1.0, -3.0, 2.0, 0.5])}, 0.5)
        >>> m["a"].tolist()
        [False, True, True, False]
    """
    if scope == "layer":
        return {k: _keep_largest(w.abs().flatten(), ratio).view_as(w) for k, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_largest(flat, ratio)
    out, start = {}, 0
    for k, w in weights.items():
        out[k] = keep[start : start + w.numel()].view_as(w)
        start += w.numel()
    return out


def _keep_largest(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    drop = int(round(ratio * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if drop:
        keep[torch.argsort(scores, stable=True)[:drop]] = False
    return keep


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest-magnitude of every ``m`` consecutive weights along the input
    dimension (per output row; a conv's row is its in_channels × kernel weights, flattened).

    Example:
        >>> nm_mask(torch.tensor([[4.0, -1.0, 3.0, 2.0]]), 2, 4).tolist()
        [[True, False, True, False]]
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ConfigError(
            f"N:M pruning needs each row's length ({rows.shape[1]}) to be a multiple of M={m}; "
            "skip this layer (PruneSpec.skip) or choose another M"
        )
    groups = rows.abs().reshape(rows.shape[0], -1, m)
    top = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(weight.shape)


def sparse_bytes(weight: torch.Tensor, *, value_bytes: int = 4) -> int:
    """Bytes to store ``weight`` the cheaper way: dense, or CSR over its rows (values, 4-byte
    column indices, row pointers). Sparse only pays below roughly half density.

    Example:
        >>> sparse_bytes(torch.zeros(10, 10)), sparse_bytes(torch.ones(10, 10))
        (44, 400)
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    nnz = int((rows != 0).sum())
    dense = rows.numel() * value_bytes
    csr = nnz * (value_bytes + 4) + (rows.shape[0] + 1) * 4
    return min(dense, csr)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with each masked layer's weight multiplied by its mask (folded in)."""
    out = copy_model(model)
    layers = quantizable_layers(out)
    with torch.no_grad():
        for fqn, mask in masks.items():
            layers[fqn].weight.mul_(mask.to(layers[fqn].weight.dtype))
    return out


def fold_stats(before: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Per-layer ratios and the size totals (dense bytes, and the cheaper of dense or sparse)."""
    layers = quantizable_layers(before)
    ratios = {k: 1.0 - float(m.float().mean()) for k, m in masks.items()}
    dense = sum(layers[k].weight.numel() * layers[k].weight.element_size() for k in masks)
    stored = sum(
        sparse_bytes(layers[k].weight.detach() * m, value_bytes=layers[k].weight.element_size())
        for k, m in masks.items()
    )
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    stats = {
        "weights_before": total,
        "weights_after": kept,
        "sparsity": 1.0 - kept / max(total, 1),
        "weight_bytes_dense": dense,
        "weight_bytes_stored": stored,
    }
    return ratios, stats


def prune_unstructured(model: nn.Module, spec: PruneSpec, data: Dataset | None = None) -> Pruned:
    """Magnitude pruning of ``spec.ratio`` of the weights (``spec.scope`` global or per layer).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> p = prune_unstructured(net, PruneSpec("unstructured", ratio=0.5, target="weights"))
        >>> round(p.stats["sparsity"], 2)
        0.5
    """
    _weights_target(spec)
    layers = prunable_weights(model, spec.skip)
    masks = magnitude_masks({k: m.weight for k, m in layers.items()}, spec.ratio, scope=spec.scope)
    ratios, stats = fold_stats(model, masks)
    return Pruned(apply_masks(model, masks), spec, ratios, {}, stats)


def prune_nm(model: nn.Module, spec: PruneSpec, data: Dataset | None = None) -> Pruned:
    """N:M pruning (``spec.n`` of every ``spec.m``) of every prunable layer but ``spec.skip``; the
    ratio is fixed by the pattern, ``1 - n/m``."""
    layers = prunable_weights(model, spec.skip)
    masks = {k: nm_mask(m.weight, spec.n, spec.m) for k, m in layers.items()}
    ratios, stats = fold_stats(model, masks)
    stats["pattern"] = f"{spec.n}:{spec.m}"
    return Pruned(apply_masks(model, masks), spec, ratios, {}, stats)


class _FixedZeros(nn.Module):
    """The parametrization ``w ↦ w·mask``: the pruned weights stay zero while the rest train."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def hold_zeros(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose prunable layers keep their zero weights zero under training
    (for fine-tuning after unstructured pruning); :func:`release_zeros` folds it back."""
    out = copy_model(model)
    for m in prunable_weights(out).values():
        mask = (m.weight.detach() != 0).to(m.weight.dtype)
        parametrize.register_parametrization(m, "weight", _FixedZeros(mask))
    return out


def release_zeros(model: nn.Module) -> nn.Module:
    """``model`` (from :func:`hold_zeros`, trained) with the masks folded into plain weights."""
    for m in list(model.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def _weights_target(spec: PruneSpec) -> None:
    if spec.target == "macs":
        raise ConfigError(
            "unstructured pruning removes no MACs on a dense runtime; state its ratio as a "
            "fraction of the weights (target='weights', --prune-weights 0.7)"
        )
