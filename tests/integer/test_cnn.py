"""Integer-only CNNs (HAWQ-V3, arXiv:2011.10680) against the fake-quant simulation they came from.

The oracle is squeezer's own simulation (``quantize``), run on the same inputs:

* layer by layer (each integer layer fed the simulation's input codes), every code equals the
  simulation's except where the simulation's float32 value lies within 1e-4 of a step from a
  rounding tie; those codes differ by exactly 1, and fewer than 1e-4 of all codes do. (On the
  digits nets a few codes per million differ, each within 2e-5 of a tie: float32 round-off of the
  simulation itself; against a float64 run of it, the few left lie within ~2e-6 of a tie.)
* end to end, a flipped code propagates; the outputs stay within 1% of their range and the
  predicted classes agree on ≥ 99% of inputs (measured: 99.8–100%).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer import LayerQuant, Plan, quantize
from squeezer.errors import UnsupportedModelError
from squeezer.integer import IntegerModel, fold_batchnorm, to_integer
from squeezer.integer.steps import IntLayer
from squeezer.quant.modules import ActQuantizer
from squeezer.templates import uniform_plan
from squeezer.zoo import create

from .batchnorm import bn_stats, randomize_bn

TIE = 1e-4  # steps: how close to a rounding tie the simulation must be for a code to differ


@pytest.fixture(scope="module")
def digits_resnet(digits):
    """An untrained residual net with data-driven BN statistics: bit-exactness needs no training."""
    torch.manual_seed(0)
    net = randomize_bn(create("digits_resnet"), 1)
    return bn_stats(net, digits.x_train[:256])


def simulate(qmodel: nn.Module, x: torch.Tensor):
    """The simulation's output, its input codes at every quantizer, and the values before rounding
    (in steps, computed in float64 from the simulation's float32 inputs)."""
    codes, pre = {}, {}

    def hook(mod, inp, out, name):
        pre[name] = inp[0].double() / mod.scale.double() + mod.zero_point.double()
        codes[name] = (torch.round(out / mod.scale) + mod.zero_point).long()

    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
        for n, m in qmodel.named_modules()
        if isinstance(m, ActQuantizer)
    ]
    try:
        with torch.no_grad():
            y = qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return y, codes, pre


def check_against_simulation(qmodel: nn.Module, imodel: IntegerModel, x: torch.Tensor) -> dict:
    y, codes, pre = simulate(qmodel, x)
    assert set(codes) == set(imodel.points)
    # Layer by layer: the integer model fed the simulation's codes at every quantizer.
    forced = {imodel.points[k]: v for k, v in codes.items()}
    acc, rec = imodel.run(x, overrides=forced, record=True)
    total = differ = 0
    for name, sim in codes.items():
        got = rec[imodel.points[name]]
        assert got.dtype == torch.int64
        diff = (got - sim).abs()
        assert int(diff.max()) <= 1, name
        p = pre[name][diff > 0]
        assert bool((((p - p.floor()) - 0.5).abs() <= TIE).all()), name  # only at near-ties
        total += sim.numel()
        differ += int((diff > 0).sum())
    assert differ <= 1e-4 * total
    # The last accumulator against the simulation's float32 output.
    y_forced = acc.double() * imodel.output_scale
    assert float((y_forced - y.double()).abs().max()) <= 1e-5 * float(y.abs().max())
    # End to end.
    y_int = imodel(x)
    assert y_int.dtype == torch.float32 and y_int.shape == y.shape
    assert float((y_int - y).abs().max()) <= 0.01 * float(y.abs().max())
    assert float((y_int.argmax(1) == y.argmax(1)).float().mean()) >= 0.99
    return {"codes": total, "differ": differ}


@pytest.mark.parametrize(
    ("name", "fold", "bits"),
    [("digits_cnn", True, 8), ("digits_cnn", False, 4), ("resnet", True, 4), ("resnet", False, 8)],
)
def test_integer_reference_matches_simulation(
    name, fold, bits, trained_digits_cnn, digits_resnet, digits
):
    net = trained_digits_cnn[0].eval() if name == "digits_cnn" else digits_resnet
    base = fold_batchnorm(net) if fold else net
    calib = digits.calibration_batches(256)
    qmodel = quantize(base, uniform_plan(base, bits, act_bits=8), calib=calib)
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    imodel = to_integer(qmodel)
    assert all(torch.equal(state[k], v) for k, v in qmodel.state_dict().items())  # untouched
    check_against_simulation(qmodel, imodel, digits.x_test[:128])
    layers = [m for m in imodel.modules() if isinstance(m, IntLayer)]
    assert layers and all(m.weight.dtype == torch.int8 for m in layers)
    assert all(int(m.weight.abs().max()) <= 2 ** (bits - 1) - 1 for m in layers)
    assert all(m.bias is None or m.bias.dtype == torch.int32 for m in layers)
    if fold:
        assert any(m.bias is not None for m in layers)


def test_integer_accuracy_equals_simulation(trained_digits_cnn, digits):
    net = fold_batchnorm(trained_digits_cnn[0].eval())
    qmodel = quantize(net, uniform_plan(net, 8, act_bits=8), calib=digits.calibration_batches(256))
    imodel = to_integer(qmodel, digits.x_test[:1])
    with torch.no_grad():
        sim = qmodel(digits.x_test).argmax(1)
    integer = imodel(digits.x_test).argmax(1)
    acc_sim = float((sim == digits.y_test).float().mean())
    acc_int = float((integer == digits.y_test).float().mean())
    assert acc_sim > 0.95 and abs(acc_sim - acc_int) <= 1 / len(digits.y_test)


def test_integer_forward_never_leaves_integers(digits_resnet, digits, float_leaks):
    calib = digits.calibration_batches(256)
    qmodel = quantize(digits_resnet, uniform_plan(digits_resnet, 4), calib=calib)
    imodel = to_integer(qmodel)
    with float_leaks() as mode:
        acc, rec = imodel.run(digits.x_test[:8], record=True)
    assert mode.leaks == []
    assert acc.dtype == torch.int64 and all(v.dtype == torch.int64 for v in rec.values())
    with float_leaks() as mode:  # the detector itself can fail
        imodel(digits.x_test[:8])
    assert mode.leaks  # the final dequantization is the one int -> float step


class _Mixed(nn.Module):
    """Conv1d paths, both pooling kinds, functional ReLU/flatten and a scaled residual add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.pool1 = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(8)
        self.pool2 = nn.AvgPool1d(2)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        a = self.pool1(F.relu(self.bn1(self.conv1(x))))
        b = torch.relu(self.bn2(self.conv2(a)) + a)
        return self.fc(torch.flatten(self.pool2(b), 1))


@pytest.mark.parametrize("fold", [True, False])
def test_conv1d_pooling_and_functional_ops(fold):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 2, 16, generator=g)
    torch.manual_seed(4)
    net = bn_stats(randomize_bn(_Mixed(), 5), x)
    base = fold_batchnorm(net) if fold else net
    qmodel = quantize(base, uniform_plan(base, 8, act_bits=8), calib=[x[:128]])
    check_against_simulation(qmodel, to_integer(qmodel, x[:1]), x[128:])


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_linear_on_sequences_with_asymmetric_weights():
    x = torch.randn(64, 7, 6, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(6)
    plan = Plan({"a": LayerQuant(act_bits=8, symmetric=False), "b": LayerQuant(4, act_bits=8)})
    qmodel = quantize(_Seq(), plan, calib=[x])
    imodel = to_integer(qmodel, x[:1])
    assert check_against_simulation(qmodel, imodel, x)["codes"] == 64 * 7 * 11
    wq = qmodel.a.weight_quantizer
    expected = wq.codes(qmodel.a.weight).long() - wq.zero_point.reshape(-1, 1).round().long()
    assert bool((wq.zero_point != 0).any())
    assert torch.equal(imodel.steps["a"].weight.long(), expected)


def test_unsupported_models_say_why(digits):
    torch.manual_seed(0)
    net = create("digits_cnn").eval()
    calib = digits.calibration_batches(128)
    weight_only = quantize(net, uniform_plan(net, 8, act_bits=None))
    with pytest.raises(UnsupportedModelError, match="act_bits"):
        to_integer(weight_only)
    plan = uniform_plan(net, 8, act_bits=8)
    layers = {**plan.layers, "fc1": LayerQuant(4, "group", 64, act_bits=8)}
    grouped = quantize(net, Plan(layers), calib=calib)
    with pytest.raises(UnsupportedModelError, match="granularity"):
        to_integer(grouped)
    partial = quantize(net, Plan({k: v for k, v in plan.layers.items() if k != "fc2"}), calib=calib)
    with pytest.raises(UnsupportedModelError, match="fc2"):
        to_integer(partial)
    sig = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    qsig = quantize(
        sig,
        Plan({"0": LayerQuant(act_bits=8), "2": LayerQuant(act_bits=8)}),
        calib=[torch.randn(8, 4, generator=torch.Generator().manual_seed(0))],
    )
    with pytest.raises(UnsupportedModelError, match="Sigmoid"):
        to_integer(qsig, torch.zeros(1, 4))
