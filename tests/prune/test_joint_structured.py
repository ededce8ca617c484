"""Structured ratios as joint-plan candidates (squeezer.prune.joint) against their oracles: the
size row against model_bytes of the really pruned, quantized model; the pruned model against the
masked one; Ω against its definition."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from squeezer.config import LayerQuant
from squeezer.data import Classification, Dataset, mean_loss
from squeezer.graph import quantizable_layers
from squeezer.measure import model_bytes
from squeezer.plan_joint import JointChoice, plan_structured
from squeezer.prune import PruneSpec
from squeezer.prune import joint as jp
from squeezer.prune.structured import masked
from squeezer.quant.primitives import quantize_weight

TPL = LayerQuant(bits=8, act_bits=8)


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 16, 24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn2(self.c2(torch.relu(self.bn1(self.c1(h))))))
        h = torch.relu(self.down(torch.relu(self.dw(h))))
        return self.fc(torch.relu(self.fc1(torch.flatten(h, 1))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Res()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def _space(net, **kw):
    return jp.joint_space(net, torch.randn(2, 1, 8, 8), round_to=4, **kw)


def _random_choice(space, rng, bits=(2, 4, 8)) -> JointChoice:
    groups = {g: rng.choice(space.ratios(g)) for g in space.removal}
    layers = {}
    for k, (og, ig) in space.layers.items():
        layers[k] = (rng.choice(bits), groups[og] if og else 0.0, groups[ig] if ig else 0.0)
    return JointChoice(groups, layers, 0.0, {})


def test_groups_follow_the_graph():
    space = _space(_net())
    assert space.layers["stem"][0] == space.layers["c2"][0] == space.layers["c1"][1]
    assert space.layers["dw"][0] == space.layers["dw"][1] == space.layers["stem"][0]  # depthwise
    assert space.layers["fc"][0] is None and space.layers["stem"][1] is None  # classes, input
    assert space.layers["fc1"][1] == space.layers["down"][0]  # the Linear after the flatten
    assert all(r[0] == 0.0 for r in (space.ratios(g) for g in space.removal))
    assert space.ratios(space.layers["c1"][0]) == (0.0, 0.25, 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_size_row_is_model_bytes_and_pruned_equals_masked(seed):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    space = _space(net)
    omega = jp.omega_hessian(space, {k: 1.0 for k in space.layers}, (2, 4, 8), TPL)
    table = jp.joint_table(space, omega, (2, 4, 8), TPL)
    ch = _random_choice(space, random.Random(seed))
    p = jp.apply_choice(net, space, ch, PruneSpec("structured"))
    plan = jp.bits_plan(p.model, ch, TPL)
    assert table.total("size_bytes", ch.groups, ch.layers) == model_bytes(p.model, plan)
    x = torch.randn(5, 1, 8, 8)
    oracle = masked(net, space.graph, space.removed(ch.groups)).eval()
    with torch.no_grad():
        torch.testing.assert_close(p.model.eval()(x), oracle(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    shrunk = quantizable_layers(p.model)
    for k, (_, ro, _ri) in ch.layers.items():
        w = shrunk[k].weight
        if space.layers[k][0] and not space.depthwise(k):
            assert w.shape[0] == round(quantizable_layers(net)[k].weight.shape[0] * (1 - ro))


def test_the_ilp_choice_holds_the_size_budget_for_real():
    net = _net()
    space = _space(net)
    omega = jp.omega_hessian(space, {k: 1.0 for k in space.layers}, (2, 4, 8), TPL)
    table = jp.joint_table(space, omega, (2, 4, 8), TPL)
    cap = 0.3 * model_bytes(net, jp.bits_plan(net, _all(space, 8), TPL))
    ch = plan_structured(table, {"size_bytes": cap})
    p = jp.apply_choice(net, space, ch, PruneSpec("structured"))
    assert model_bytes(p.model, jp.bits_plan(p.model, ch, TPL)) <= cap
    assert any(ch.groups.values())  # at 2 bits everywhere the model is still larger than cap


def _all(space, b):
    return JointChoice({}, {k: (b, 0.0, 0.0) for k in space.layers}, 0.0, {})


def test_omega_hessian_is_the_second_order_estimate():
    net = _net()
    space = _space(net)
    traces = {k: float(i + 1) for i, k in enumerate(space.layers)}
    om = jp.omega_hessian(space, traces, (4, 32), TPL)
    layers = quantizable_layers(net)
    w = layers["c1"].weight.detach()
    n = w.numel()
    q, _ = quantize_weight(w, 4, channel_axis=0)
    assert om["c1"][4, 0.0, 0.0] == pytest.approx(0.5 * traces["c1"] / n * float(
        (q.reshape(w.shape) - w).double().pow(2).sum()), rel=1e-6)  # fmt: skip
    ko, ki = space.kept("c1", 0.5, 0.25)
    kept = w[ko][:, ki]
    gone = float(w.double().pow(2).sum() - kept.double().pow(2).sum())
    assert om["c1"][32, 0.5, 0.25] == pytest.approx(0.5 * traces["c1"] / n * gone, rel=1e-6)
    assert om["c1"][32, 0.0, 0.0] == 0.0


def _data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    return Dataset("toy", x[:64], y[:64], x[64:], y[64:], task=Classification())


def test_omega_measured_is_the_loss_increase_of_the_perturbed_layer():
    net, data = _net(), _data()
    space = _space(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    om = jp.omega_measured(space, data, (4,), TPL, samples=64)
    batches = list(data.analysis_batches(64, seed=0))
    base = mean_loss(net, batches, data.task)
    # oracle: c1's removed input channels zeroed (what removing them does), kept weights quantized
    ko, ki = space.kept("c1", 0.25, 0.5)
    ref = _net()
    w = ref.c1.weight.detach().clone()
    drop = [i for i in range(16) if i not in ki]
    w[:, drop] = 0
    q, _ = quantize_weight(w[ko][:, ki], 4, channel_axis=0)
    w[torch.tensor(ko)[:, None], torch.tensor(ki)[None, :]] = q.reshape(len(ko), len(ki), 3, 3)
    with torch.no_grad():
        ref.c1.weight.copy_(w)
    expected = mean_loss(ref, batches, data.task) - base
    assert om["c1"][4, 0.25, 0.5] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert all(torch.equal(before[k], v) for k, v in space.model.state_dict().items())


def test_latency_row_predicts_the_dense_model_at_its_measurement():
    net = _net()
    space = _space(net)
    omega = jp.omega_hessian(space, {k: 1.0 for k in space.layers}, (4, 8), TPL)
    lat = {k: {c: 0.1 * (1 - c[1]) * (1 - c[2]) for c in row} for k, row in omega.items()}
    table = jp.joint_table(space, omega, (4, 8), TPL, latency=lat, whole_latency_ms=5.0)
    zero = dict.fromkeys(space.removal, 0.0)
    assert table.total("latency_ms", zero, {k: (8, 0.0, 0.0) for k in space.layers}) == pytest.approx(5.0)
    ch = plan_structured(table, {"latency_ms": 4.8})
    assert ch.achieved["latency_ms"] <= 4.8 and any(ch.groups.values())


def test_bad_ratios_are_refused():
    from squeezer.errors import ConfigError

    with pytest.raises(ConfigError, match="include 0"):
        _space(_net(), ratios=(0.25, 0.5))
