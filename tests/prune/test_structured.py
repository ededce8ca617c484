"""Structured pruning: the pruned model computes what the masked model computes (to round-off) on
residual, concat, depthwise and flatten-Linear nets; MACs reach the target; reload; the user's
model is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer.errors import ConfigError
from squeezer.measure import profile_layers
from squeezer.prune import PRUNERS, PruneSpec, prune
from squeezer.prune.depgraph import build
from squeezer.prune.structured import _Counter, channel_scores, masked, rebuild, select
from squeezer.zoo import create


class DepthwiseNet(nn.Module):
    """MobileNet-like: depthwise-separable blocks with a residual over the block, SE-style scale."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dwbn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1, bias=False)
        self.pwbn = nn.BatchNorm2d(16)
        self.gate = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.dwbn(self.dw(x)))
        y = self.pwbn(self.pw(y))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        x = torch.relu(x + y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


CASES = {
    "residual": (lambda: create("digits_resnet"), (1, 8, 8)),
    "residual_1d": (lambda: create("mnist1d_resnet"), (1, 40)),
    "flatten_linear": (lambda: create("digits_cnn"), (1, 8, 8)),
    "concat": (lambda: create("squeezenet1_1", classes=10), (3, 64, 64)),
    "depthwise": (DepthwiseNet, (3, 8, 8)),
    # stride-2 depthwise convs after an asymmetric F.pad (TensorFlow "SAME"), inverted residuals
    "efficientnet": (lambda: create("efficientnet_lite0", classes=10, image_size=32), (3, 32, 32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_equals_masked(case):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = _randomize_bn(factory())
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, *shape)
    spec = PruneSpec("structured", ratio=0.5, options={"input_shape": list(shape)})
    graph = build(copy.deepcopy(model), x[:2])
    removed = select(graph, _Counter(model, graph, x[:2]), channel_scores(graph), spec)
    assert removed, "nothing was pruned"
    p = prune(model, spec)
    with torch.no_grad():
        want = masked(model, graph, removed)(x)
        got = p.model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    macs = sum(v.macs for v in profile_layers(p.model, x[:1]).values())
    dense = sum(v.macs for v in profile_layers(model, x[:1]).values())
    assert macs <= 0.5 * dense + 1e-6 and macs > 0.3 * dense
    assert p.stats["macs_after"] == pytest.approx(macs)
    # the user's model is untouched: same weights, no hooks, no extra attributes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # plain layers only: no masks, no parametrizations
    assert not any(hasattr(m, "parametrizations") for m in p.model.modules())
    assert not any("mask" in k or "orig" in k for k in p.model.state_dict())


@pytest.mark.parametrize("case", ["residual", "concat", "depthwise"])
def test_rebuild_and_reload(case, tmp_path):
    factory, shape = CASES[case]
    model = _randomize_bn(factory())
    p = prune(model, PruneSpec("structured", ratio=0.4, options={"input_shape": list(shape)}))
    torch.save(p.model.state_dict(), tmp_path / "w.pt")
    fresh = rebuild(factory(), p.architecture)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    fresh.eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), p.model(x))


def test_same_padding_keeps_channels_prunable():
    """The expansion channels of EfficientNet's stride-2 blocks (padded by ``F.pad`` before their
    depthwise conv) are prunable, not pinned as an unknown op's would be."""
    model = create("efficientnet_lite0", classes=10, image_size=32).eval()
    graph = build(model, torch.zeros(2, 3, 32, 32))
    owners = {u.fqn for uses in graph.channels().values() for u in uses}
    padded = [f"blocks.{i}" for i, b in enumerate(model.blocks) if b.depthwise.pad]
    assert padded, "the test net has no padded block"
    for name in padded:
        assert f"{name}.depthwise.conv" in owners, name


def test_residual_channels_are_coupled():
    model = create("digits_resnet").eval()
    graph = build(model, torch.zeros(2, 1, 8, 8))
    # a channel of the residual stream appears in the stem, both blocks' second conv ... at once
    sizes = sorted(len({u.fqn for u in uses}) for uses in graph.channels().values())
    assert sizes[-1] >= 4


def test_params_target_and_layer_scope():
    model = _randomize_bn(create("digits_cnn"))
    spec = PruneSpec("structured", ratio=0.3, target="params", scope="layer",
                     options={"input_shape": [1, 8, 8]})  # fmt: skip
    p = prune(model, spec)
    assert p.stats["params_after"] < p.stats["params_before"]
    assert p.model.fc2.out_features == 10  # classes are kept


def test_unknown_op_pins_channels():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
            return self.c(torch.relu(self.b(y)))

    graph = build(Shuffle(), torch.zeros(2, 1, 6, 6))
    owners = {u.fqn for uses in graph.channels().values() for u in uses}
    assert "a" not in owners  # the shuffled channels stay whole
    assert "b" in owners


def test_bad_requests():
    model = create("digits_cnn")
    with pytest.raises(ConfigError):
        PruneSpec("structured", ratio=1.2)
    with pytest.raises(ConfigError):
        prune(model, PruneSpec("nope"))
    with pytest.raises(ConfigError):
        prune(model, PruneSpec("structured", 0.5))  # no data, no input shape
    with pytest.raises(ConfigError):
        # nothing to prune: the only layer's inputs and outputs are the model's
        prune(
            nn.Sequential(nn.Linear(9, 2)),
            PruneSpec("structured", 0.5, options={"input_shape": [9]}),
        )


def test_registry_lists_pruners():
    assert {"structured", "unstructured", "nm"} <= set(PRUNERS)


@pytest.mark.parametrize("round_to", [1, 8])
def test_widths_rounded(round_to):
    model = _randomize_bn(create("mnist1d_resnet"))
    spec = PruneSpec("structured", 0.5, round_to=round_to, options={"input_shape": [1, 40]})
    p = prune(model, spec)
    widths = [m.out_channels for m in p.model.modules() if isinstance(m, nn.Conv1d)]
    assert p.stats["macs_after"] <= 0.5 * p.stats["macs_before"]
    if round_to == 8:
        assert all(w % 8 == 0 for w in widths), widths
    else:
        assert any(w % 8 for w in widths), widths
