"""LEAP: learned thresholds end at the target ratio, the result is a plain model (no
parametrizations, zeros in the weights), the user's model is untouched; unstructured pruning's
fine-tuning keeps the zeros."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from squeezer.data import evaluate
from squeezer.errors import ConfigError
from squeezer.prune import PruneSpec, prune
from squeezer.prune.stage import prune_stage
from squeezer.prune.thresholds import _Penalty


@pytest.fixture(scope="module")
def net(trained_digits_cnn):
    return trained_digits_cnn[0].eval()


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_leap_reaches_target(net, digits, ratio):
    before = copy.deepcopy(net.state_dict())
    p = prune(net, PruneSpec("leap", ratio, target="weights", options={"epochs": 4}), digits)
    assert abs(p.stats["sparsity"] - ratio) <= 0.005 + 1e-9  # the default tolerance
    assert abs(p.stats["learned_ratio"] - ratio) < 0.05  # the thresholds themselves got close
    assert not any(parametrize.is_parametrized(m) for m in p.model.modules())
    assert type(p.model.conv1) is nn.Conv2d
    zeros = sum(int((m.weight == 0).sum()) for m in p.model.modules() if hasattr(m, "weight")
                and isinstance(m, nn.Conv2d | nn.Linear))  # fmt: skip
    assert zeros == pytest.approx(p.stats["sparsity"] * p.stats["weights_before"], abs=2)
    if ratio == 0.5:  # at 90% four epochs are too few for LEAP here (see the module docstring)
        assert evaluate(p.model, digits.test_batches(), digits.task) > 80
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_penalty_adds_the_regulariser_gradient():
    y = torch.randn(3, requires_grad=True)
    t = torch.tensor(2.0, requires_grad=True)
    out = _Penalty.apply(y, t**2)
    assert torch.equal(out, y)
    out.sum().backward()
    assert float(t.grad) == pytest.approx(4.0)  # d(t²)/dt, as if t² were in the loss
    assert torch.equal(y.grad, torch.ones(3))


def test_leap_bad_input(net, digits):
    with pytest.raises(ConfigError, match="data"):
        prune(net, PruneSpec("leap", 0.5, target="weights"))
    with pytest.raises(ConfigError, match="unknown LEAP"):
        prune(net, PruneSpec("leap", 0.5, target="weights", options={"epoch": 2}), digits)


def test_unstructured_finetune_keeps_zeros(net, digits):
    st = prune_stage(net, digits, PruneSpec("unstructured", 0.8, target="weights"),
                     finetune_epochs=2)  # fmt: skip
    w = torch.cat([m.weight.flatten() for m in st.model.modules()
                   if isinstance(m, nn.Conv2d | nn.Linear)])  # fmt: skip
    assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
    assert not any(parametrize.is_parametrized(m) for m in st.model.modules())
    assert st.record["finetune"]["metric"] >= st.record["pruned"]["metric"] - 1
