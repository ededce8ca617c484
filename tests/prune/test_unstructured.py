"""Unstructured and N:M magnitude pruning: exact counts, the pattern holds, zeros are folded into
plain weights, sizes are counted honestly and the user's model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer.errors import ConfigError
from squeezer.prune import PruneSpec, prune
from squeezer.prune.unstructured import magnitude_masks, nm_mask, sparse_bytes
from squeezer.zoo import create


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_exact_ratio(scope):
    torch.manual_seed(0)
    model = create("digits_cnn")
    before = copy.deepcopy(model.state_dict())
    p = prune(model, PruneSpec("unstructured", ratio=0.7, target="weights", scope=scope))
    layers = {k: m for k, m in p.model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    assert zeros == pytest.approx(0.7 * total, abs=len(layers))
    if scope == "layer":
        for k, r in p.ratios.items():
            assert r == pytest.approx(0.7, abs=1 / layers[k].weight.numel())
    # the zeros are the smallest weights: every kept weight is at least as large as every zero
    w = torch.cat([before[f"{k}.weight"].flatten() for k in layers]).abs()
    kept = torch.cat([m.weight.flatten() != 0 for m in layers.values()])
    if scope == "global":
        assert w[kept].min() >= w[~kept].max()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(hasattr(m, "weight_mask") or m._forward_pre_hooks for m in p.model.modules())


def test_nm_pattern():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    mask = nm_mask(w, 2, 4)
    assert (mask.reshape(6, 4, 4).sum(-1) == 2).all()
    # within every group of 4, the kept two are the two largest
    g = w.abs().reshape(6, 4, 4)
    kept_min = torch.where(mask.reshape(6, 4, 4), g, torch.inf).amin(-1)
    drop_max = torch.where(~mask.reshape(6, 4, 4), g, -torch.inf).amax(-1)
    assert (kept_min >= drop_max).all()
    with pytest.raises(ConfigError):
        nm_mask(torch.randn(2, 6), 2, 4)


def test_nm_model_and_sizes():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    p = prune(model, PruneSpec("nm", n=2, m=4))
    assert p.stats["sparsity"] == pytest.approx(0.5)
    # at 50% density CSR (8 B a value) costs as much as dense: stored stays dense
    assert p.stats["weight_bytes_stored"] == p.stats["weight_bytes_dense"]
    sparse = prune(model, PruneSpec("unstructured", ratio=0.9, target="weights"))
    assert sparse.stats["weight_bytes_stored"] < 0.5 * sparse.stats["weight_bytes_dense"]


def test_sparse_bytes_and_masks_doc():
    assert sparse_bytes(torch.zeros(3, 4)) == 16  # 4 row pointers
    m = magnitude_masks({"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([2.0, 0.5])}, 0.5)
    assert m["a"].tolist() == [True, False] and m["b"].tolist() == [True, False]


def test_unstructured_refuses_macs_target():
    with pytest.raises(ConfigError, match="MACs"):
        prune(create("digits_cnn"), PruneSpec("unstructured", ratio=0.5))
    with pytest.raises(ConfigError):
        prune(create("digits_cnn"), PruneSpec("unstructured", 0.5, target="weights", skip=("x",)))
