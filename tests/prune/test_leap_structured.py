"""LEAP on channels: the wrapper's hard-masked model computes what the really smaller model
computes (the masked-model oracle of structured pruning) and its densities are the exact MAC
count; training ends at the target; the result is a plain smaller model that reloads from its
architecture; the user's model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from squeezer.data import evaluate
from squeezer.errors import ConfigError
from squeezer.prune import PruneSpec, prune
from squeezer.prune.leap_structured import CHANNEL_DEFAULTS, ChannelLeap
from squeezer.prune.structured import _Counter, rebuild, shrink, traced_graph
from squeezer.zoo import create

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(trained_digits_cnn):
    return trained_digits_cnn[0].eval()


def _wrapper(model, example, ratio=0.5, round_to=1):
    spec = PruneSpec("leap", ratio, round_to=round_to)
    work, graph = traced_graph(model, example)
    counter = _Counter(work, graph, example)
    leap = ChannelLeap(model, spec, 100, dict(CHANNEL_DEFAULTS), graph=graph, counter=counter)
    return leap, graph, counter


@pytest.mark.parametrize("name,shape", [("digits_resnet", (1, 8, 8)), ("mnist1d_resnet", (1, 40))])
def test_hard_masks_equal_the_smaller_model(name, shape):
    torch.manual_seed(0)
    model = create(name).eval()
    x = torch.randn(4, *shape)
    leap, graph, counter = _wrapper(model, x[:2])
    with torch.no_grad():  # thresholds moved so that a good share of the channels are masked
        leap.theta.fill_(0.0)
        leap.theta.add_(torch.randn(leap.theta.shape) * 0.1 / leap.opts["threshold_speed"])
        removed = leap.removal()
        assert 0 < len(removed) < len(graph.channels())
        leap.eval()
        y_masked = leap(x)
        leap.prepare()  # the forward consumed its masks: compute them again
        soft = float(leap.soft_density())
    plain = copy.deepcopy(leap.model)
    for fqn in leap.consumers:
        parametrize.remove_parametrizations(
            plain.get_submodule(fqn), "weight", leave_parametrized=False
        )
    small, _ = shrink(plain, graph, removed)
    torch.testing.assert_close(y_masked, small.eval()(x), atol=1e-5, rtol=1e-5)
    exact = counter.total(removed, "macs") / counter.total(set(), "macs")
    assert leap.hard_density() == pytest.approx(exact)
    assert soft == pytest.approx(exact, abs=1e-6)  # evaluation masks are exactly 0 or 1


def test_soft_density_has_gradient_for_the_thresholds():
    torch.manual_seed(0)
    model = create("digits_resnet").eval()
    leap, _, _ = _wrapper(model, torch.randn(2, 1, 8, 8))
    leap.train()
    leap.prepare()
    d = leap.soft_density()
    d.backward()
    assert leap.theta.grad is not None and float(leap.theta.grad.abs().sum()) > 0
    assert float(leap.theta.grad.max()) <= 0  # raising a threshold only lowers the density


def test_leap_channels_reaches_target_and_reloads(net, digits):
    before = copy.deepcopy(net.state_dict())
    spec = PruneSpec("leap", 0.5, target="macs", round_to=1)
    p = prune(net, spec, digits)
    kept = p.stats["macs_after"] / p.stats["macs_before"]
    assert 0.5 - 0.02 <= kept <= 0.5 + 1e-9  # at most the target, within a channel or two
    assert p.architecture and type(p.model.conv1) is nn.Conv2d
    assert p.model.conv1.out_channels < net.conv1.out_channels or p.model.conv2.out_channels < (
        net.conv2.out_channels
    )
    assert not any(parametrize.is_parametrized(m) for m in p.model.modules())
    assert evaluate(p.model, digits.test_batches(), digits.task) > 80
    again = rebuild(net, p.architecture)
    again.load_state_dict(p.model.state_dict())
    x = digits.example(8)
    torch.testing.assert_close(again.eval()(x), p.model.eval()(x))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_leap_channels_bad_input(net, digits):
    with pytest.raises(ConfigError, match="data"):
        prune(net, PruneSpec("leap", 0.5, target="macs"))
    with pytest.raises(ConfigError, match="unknown LEAP"):
        prune(net, PruneSpec("leap", 0.5, target="macs", options={"travl": 2}), digits)
