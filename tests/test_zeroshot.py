"""Tests of ZeroQ distilled data (squeezer.zeroshot)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer import zeroshot
from squeezer.errors import ConfigError, UnsupportedModelError
from squeezer.zeroshot import batchnorm_layers, bn_stat_loss, distill, distill_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_net(seed: int = 0) -> nn.Module:
    """A conv net with BN after convs and after a linear layer, whose running statistics come from
    structured data (so they are far from what standard-normal noise produces)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average: exact statistics of the data below
        for _ in range(20):
            x = torch.rand(64, 1, 8, 8, generator=g) * 2.0 + 0.5
            x[:, :, :, :4] *= 0.2  # some structure: dim left half
            net((x - 1.0) / 0.75)  # roughly standardised, as the default input prior assumes
    return net.eval()


def _all_pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("match", ["sample", "batch"])
def test_bn_statistics_loss_drops_at_least_50x(match):
    # Measured: own loss 228x (sample) / 2200x (batch); batch loss vs noise 640x / 2100x.
    net = _bn_net()
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    res = distill(net, 32, input_shape=(1, 8, 8), steps=150, seed=0, match=match)
    assert res.inputs.shape == (32, 1, 8, 8)
    assert res.n_bn == 3
    # The optimisation's own record, and an independent re-measurement of ZeroQ's batch loss.
    assert res.loss_after < res.loss_before / 50
    assert bn_stat_loss(net, res.inputs) < bn_stat_loss(net, noise) / 50
    assert res.seconds > 0


@pytest.mark.parametrize("match", ["sample", "batch"])
def test_first_bn_statistics_are_matched_without_a_preceding_conv(match):
    # BN as the very first layer: its input is the distilled data itself, so with no prior the
    # data's per-channel mean and std must land on the running statistics.
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([2.0, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
    net = nn.Sequential(bn, nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    x = distill_data(net, 48, input_shape=(3, 5, 5), steps=300, match=match)
    ref_std = (bn.running_var + bn.eps).sqrt()
    mean = x.mean(dim=(0, 2, 3))
    std = x.transpose(0, 1).reshape(3, -1).std(1, unbiased=False)
    torch.testing.assert_close(mean, bn.running_mean, atol=0.02, rtol=0)
    torch.testing.assert_close(std, ref_std, atol=0.02, rtol=0.01)
    per_mean, per_std = x.mean(dim=(2, 3)), x.flatten(2).std(2, unbiased=False)
    spread = (per_mean - bn.running_mean).abs().max()
    if match == "sample":  # every input matches on its own
        assert spread < 0.05
        torch.testing.assert_close(per_std, ref_std.expand(48, 3), atol=0.05, rtol=0)
    else:  # only the batch as a whole does: inputs keep their random spread
        assert spread > 0.1


def test_mlp_with_batchnorm1d():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3)
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # running statistics of skewed data: exponential, scaled per feature
        net(torch.empty(512, 12).exponential_(generator=g) * torch.linspace(0.2, 2.0, 12))
    net.eval()
    res = distill(net, 40, input_shape=(12,), steps=150, prior=None)
    assert res.inputs.shape == (40, 12)
    assert res.loss_after < res.loss_before / 50


def test_same_seed_same_data_other_seed_other_data():
    net = _bn_net()
    a = distill_data(net, 10, input_shape=(1, 8, 8), steps=20, seed=3)
    b = distill_data(net, 10, input_shape=(1, 8, 8), steps=20, seed=3)
    c = distill_data(net, 10, input_shape=(1, 8, 8), steps=20, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_model_untouched():
    net = _bn_net().train()
    before = copy.deepcopy(net.state_dict())
    grads = [p.requires_grad for p in net.parameters()]
    distill_data(net, 16, input_shape=(1, 8, 8), steps=10)
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # bit-identical, running stats included
    assert [p.requires_grad for p in net.parameters()] == grads
    assert net.training  # mode not switched
    assert _all_pre_hooks(net) == 0


@pytest.fixture
def spy_copies(monkeypatch):
    """Record the private copies distill works on, so tests can inspect their hooks."""
    copies: list[nn.Module] = []

    def spy(model: nn.Module) -> nn.Module:
        copies.append(copy.deepcopy(model))
        return copies[-1]

    monkeypatch.setattr(zeroshot, "copy_model", spy)
    return copies


def test_hooks_removed_after_callback_raises(spy_copies):
    net = _bn_net()

    def boom(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt  # the way a user stops a long run

    with pytest.raises(KeyboardInterrupt):
        distill(net, 8, input_shape=(1, 8, 8), steps=50, callback=boom)
    (work,) = spy_copies
    assert len(batchnorm_layers(work)) == 3
    assert _all_pre_hooks(work) == 0


class _FailsOnCall(nn.Module):
    """Identity that raises on its n-th call."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("forward failed")
        return x


def test_hooks_removed_after_forward_raises(spy_copies):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), _FailsOnCall(3), nn.BatchNorm2d(4))
    net.eval()
    with pytest.raises(RuntimeError, match="forward failed"):
        distill(net, 8, input_shape=(1, 6, 6), steps=10)
    (work,) = spy_copies
    assert work[2].calls == 3  # it did fail mid-distillation, after two good steps
    assert _all_pre_hooks(work) == 0


def test_no_batchnorm_raises_unsupported_naming_real_calibration():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="--calib real"):
        distill_data(net, 4, input_shape=(4,))
    with pytest.raises(UnsupportedModelError):
        bn_stat_loss(net, torch.randn(4, 4))
    # A BN that keeps no running statistics holds nothing to match either.
    net2 = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(UnsupportedModelError):
        distill_data(net2, 4, input_shape=(4,))


def test_input_shape_from_attribute_example_or_error():
    net = _bn_net()
    with pytest.raises(ConfigError, match="input_shape"):
        distill_data(net, 4, steps=1)
    x = distill_data(net, 4, example=torch.zeros(2, 1, 8, 8), steps=1, progress=True)
    assert x.shape == (4, 1, 8, 8)
    net.input_shape = (1, 8, 8)
    assert distill_data(net, 3, steps=1).shape == (3, 1, 8, 8)
    with pytest.raises(ConfigError):
        distill_data(net, 3, input_shape=(1, 0, 8), steps=1)
    with pytest.raises(ConfigError):
        distill_data(net, 0, steps=1)


class _BatchSizes(nn.Module):
    """Identity that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        return x


def test_chunks_cover_n_without_a_single_input_chunk(spy_copies):
    net = nn.Sequential(_BatchSizes(), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    x = distill_data(net, 9, input_shape=(1, 6, 6), steps=2, batch_size=4)
    assert x.shape == (9, 1, 6, 6)
    # 9 = 4 + 5 (a last chunk of 1 has no spread to match, so it joins the one before);
    # per chunk: 2 steps, then one evaluation of the final inputs.
    assert spy_copies[0][0].sizes == [4, 4, 4, 5, 5, 5]


def test_input_prior_pulls_input_statistics():
    # One BN on a 1-d projection of a 6-d input leaves 5 directions free: the prior sets them.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 1), nn.BatchNorm1d(1)).eval()
    with torch.no_grad():  # statistics the prior can meet: the projection of mean-2 inputs
        net[1].running_mean.fill_(float(net[0].weight.sum() * 2.0 + net[0].bias))
        net[1].running_var.fill_(0.01)
    x = distill_data(net, 64, input_shape=(6,), steps=300, prior=(2.0, 0.5))
    assert abs(float(x.mean()) - 2.0) < 0.05
    assert abs(float(x.std(unbiased=False)) - 0.5) < 0.05
    assert bn_stat_loss(net, x) < 1e-3
    with pytest.raises(ConfigError):
        distill_data(net, 4, input_shape=(6,), prior=(0.0, -1.0))


def _kl_by_hand(net: nn.Module, x: torch.Tensor, fqn: str, wq: torch.Tensor) -> float:
    q = copy.deepcopy(net).eval()
    with torch.no_grad():
        q.get_submodule(fqn).weight.copy_(wq)
        p = torch.softmax(net.eval()(x), -1)
        r = torch.softmax(q(x), -1)
    return float((p * (p.log() - r.log())).sum(-1).mean())


def test_kl_sensitivity_matches_hand_computation_and_grows_as_bits_shrink():
    from squeezer.quant.primitives import quantize_weight
    from squeezer.sensitivity import SENSITIVITY_METHODS, sensitivity

    assert "kl" in SENSITIVITY_METHODS
    net = _bn_net()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    before = copy.deepcopy(net.state_dict())
    s = sensitivity(net, method="kl", data=[x], bits=(2, 4, 8, 32))
    assert s.method == "kl" and list(s.omega) == ["0", "3", "7", "10"]
    for fqn in s.omega:
        wq, _ = quantize_weight(net.get_submodule(fqn).weight.detach(), 2)
        assert s.omega[fqn][2] == pytest.approx(_kl_by_hand(net, x, fqn, wq), rel=1e-4, abs=1e-7)
        assert s.omega[fqn][32] == 0.0
        assert s.omega[fqn][2] > s.omega[fqn][4] > s.omega[fqn][8] >= 0.0
    # (inputs, targets) batches give the same numbers: targets are ignored.
    s2 = sensitivity(net, method="kl", data=[(x, torch.zeros(32, dtype=torch.long))], bits=(2,))
    assert s2.omega["0"][2] == pytest.approx(s.omega["0"][2], rel=1e-6)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_kl_sensitivity_without_data_distills():
    from squeezer.sensitivity import sensitivity

    net = _bn_net()
    net.input_shape = (1, 8, 8)
    s = sensitivity(net, method="kl", bits=(2, 8), n=16, steps=20)
    x = zeroshot.zeroshot_batches(net, 16, steps=20)
    s_ref = sensitivity(net, method="kl", data=x, bits=(2, 8))
    assert s.omega == s_ref.omega  # same seed (0), same distilled data, same table
    assert all(row[2] > row[8] for row in s.omega.values())


def test_quantize_zeroshot_calibrates_with_percentile_on_distilled_data():
    from squeezer.config import LayerQuant, QuantConfig
    from squeezer.quant.modules import ActQuantizer
    from squeezer.quant.primitives import observe

    net = _bn_net()
    cfg = QuantConfig(LayerQuant(bits=8, act_bits=8))
    q = zeroshot.quantize_zeroshot(net, cfg, n=16, seed=2, input_shape=(1, 8, 8), steps=20)
    acts = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    assert len(acts) == 4 and all(a.observer == "percentile" and bool(a.calibrated) for a in acts)
    # The first layer's input is the distilled data itself: its range is that data's percentiles.
    x = distill_data(net, 16, seed=2, input_shape=(1, 8, 8), steps=20)
    qp = observe(x.reshape(1, 1, -1), 8, False, "percentile", 99.99)
    first = next(m for m in q.modules() if isinstance(m, ActQuantizer))
    assert float(first.scale) == pytest.approx(float(qp.scale), rel=1e-6)
    # On inputs like the ones the BN statistics came from, outputs stay close to the float model's
    # (measured 27.5 dB; real-data calibration gives 28.5 dB).
    from squeezer.quant.primitives import sqnr_db

    t = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(9)) * 2.0 + 0.5
    t[:, :, :, :4] *= 0.2
    t = (t - 1.0) / 0.75
    with torch.no_grad():
        assert sqnr_db(net(t), q(t)) > 24.0
