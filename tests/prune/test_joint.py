"""Joint (bits, prune ratio) sensitivity and size costs against their oracles."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from squeezer import measure
from squeezer.config import LayerQuant, Plan
from squeezer.costs import joint_size_bytes, plan_costs
from squeezer.errors import ConfigError
from squeezer.graph import quantizable_layers

sens_mod = importlib.import_module("squeezer.sensitivity")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_ratio_zero_is_the_trace_sensitivity_and_float_is_pure_pruning():
    net = _net()
    traces = {"0": 3.0, "3": 0.7}
    om = sens_mod.joint_sensitivity(net, traces, (2, 4, 32), (0.0, 0.5))
    layers = quantizable_layers(net)
    req = sens_mod.SensitivityRequest(model=net, layers=layers, bits=(2, 4, 32))
    for k, tr in traces.items():
        n = layers[k].weight.numel()
        for b in (2, 4):
            assert om[k][b, 0.0] == pytest.approx(0.5 * tr / n * req.perturbation(k, b), rel=1e-6)
        w = layers[k].weight.detach().abs().flatten().sort().values
        dropped = float(w[: round(n / 2)].double().pow(2).sum())
        assert om[k][32, 0.5] == pytest.approx(0.5 * tr / n * dropped, rel=1e-6)
        assert om[k][32, 0.0] == 0.0


def test_joint_sensitivity_keeps_the_model_and_rejects_bad_ratios():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sens_mod.joint_sensitivity(net, {"0": 1.0}, (4,), (0.0, 0.9))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        sens_mod.joint_sensitivity(net, {"0": 1.0}, (4,), (1.0,))


def test_joint_size_dense_matches_measure_and_sparse_only_where_it_pays():
    net = _net()
    size = joint_size_bytes(net, ["0", "3"], (2, 4, 8), (0.0, 0.25, 0.75))
    costs = plan_costs(net, (2, 4, 8))
    for k in ("0", "3"):
        for b in (2, 4, 8):
            assert size[k][b, 0.0] == costs.size_bytes[k][b]
            assert size[k][b, 0.25] <= size[k][b, 0.0]
        # at 2 bits a bitmap (1 bit/weight) costs more than 25% zeros save (0.5 bit/weight)
        assert size[k][2, 0.25] == size[k][2, 0.0]
        assert size[k][8, 0.75] < size[k][8, 0.25] < size[k][8, 0.0]
    plan = Plan({k: LayerQuant(bits=8, act_bits=8) for k in ("0", "3")})
    total = costs.fixed_bytes + sum(size[k][8, 0.0] for k in ("0", "3"))
    assert total == pytest.approx(measure.model_bytes(net, plan))
