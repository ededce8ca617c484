"""EfficientNet-Lite through the integer-only CNN path (ReLU6, depthwise convs, "SAME" padding of
the float input and of accumulators, global pooling) against the fake-quant simulation it came
from, on a small image size so it runs in seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer import quantize
from squeezer.errors import UnsupportedModelError
from squeezer.integer import fold_batchnorm, to_integer
from squeezer.integer.steps import IntClamp, IntPad, QuantizeInput
from squeezer.templates import uniform_plan
from squeezer.zoo import create

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_data_statistics(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics set to those of ``x`` (one cumulative pass), so a random net
    has activations of sensible size at every depth."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net.train()(x)
    return net.eval()


def test_relu6_clamps_at_six_accumulator_steps():
    clamp = IntClamp(torch.tensor([[[12]], [[600]]]))
    a = torch.tensor([[[[-5, 7, 13]], [[-1, 599, 601]]]])
    assert clamp(a).tolist() == [[[[0, 7, 12]], [[0, 599, 600]]]]


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_efficientnet_matches_its_simulation_layer_by_layer(bits):
    # integer.test_cnn's oracle: each integer layer fed the simulation's input codes
    from integer.test_cnn import TIE, simulate

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(40, 3, 64, 64, generator=g)
    net = _with_data_statistics(create("efficientnet_lite0", image_size=64, classes=10), x[:32])
    folded = fold_batchnorm(net)
    qmodel = quantize(folded, uniform_plan(folded, bits, act_bits=8), calib=[x[:32]])
    imodel = to_integer(qmodel, x[:1])
    kinds = [type(m) for m in imodel.steps.values()]
    # the stem's TensorFlow "SAME" padding (0, 1, 0, 1) of the float input, before its quantizer
    assert kinds[:2] == [IntPad, QuantizeInput]
    assert kinds.count(IntClamp) == sum(isinstance(m, nn.ReLU6) for m in net.modules())
    y, codes, pre = simulate(qmodel, x[32:])
    assert set(codes) == set(imodel.points) and len(codes) == 50
    acc, rec = imodel.run(x[32:], overrides={imodel.points[k]: v for k, v in codes.items()},
                          record=True)  # fmt: skip
    total = differ = 0
    for name, sim in codes.items():
        diff = (rec[imodel.points[name]] - sim).abs()
        assert int(diff.max()) <= 1, name
        p = pre[name][diff > 0]
        assert bool((((p - p.floor()) - 0.5).abs() <= TIE).all()), name  # only at near-ties
        total, differ = total + sim.numel(), differ + int((diff > 0).sum())
    assert differ <= 1e-4 * total
    y_forced = acc.double() * imodel.output_scale
    assert float((y_forced - y.double()).abs().max()) <= 1e-5 * float(y.abs().max())
    # End to end, a code flipped at a near-tie propagates: through 16 blocks of a random net it
    # grows (measured: most outputs equal to 1e-7, a few far off), so only the shape is checked
    # here; the pretrained model's end-to-end agreement is in benchmarks/efficientnet.py.
    assert imodel(x[32:]).shape == y.shape


class _PadThenRelu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=True)

    def forward(self, x):
        return F.relu6(self.conv(F.pad(x, (1, 0, 0, 1))))


def test_functional_relu6_and_input_padding_are_exact_on_a_small_net():
    x = 12 * torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = _PadThenRelu6().eval()
    qmodel = quantize(net, uniform_plan(net, 8, act_bits=8), calib=[x])
    imodel = to_integer(qmodel, x[:1])
    with torch.no_grad():
        y, y_int = qmodel(x), imodel(x)
    assert float(y.max()) == pytest.approx(6.0) and float(y.min()) == 0.0  # both clamps bite
    step = float(qmodel.conv.input_quantizer.scale) * float(
        qmodel.conv.weight_quantizer.scale.max()
    )
    assert float((y_int - y).abs().max()) <= step  # one accumulator step: float round-off only


def test_padding_with_a_value_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(F.pad(x, (1, 1), value=1.0))

    x = torch.randn(8, 1, 4, 4)
    net = Net().eval()
    qmodel = quantize(net, uniform_plan(net, 8, act_bits=8), calib=[x])
    with pytest.raises(UnsupportedModelError, match="zero padding"):
        to_integer(qmodel, x[:1])


def test_dead_channels_compile_and_output_their_bias():
    # Pretrained nets have dead channels (EfficientNet-Lite0's stem: weights 0 to 1e-7): their
    # per-channel weight scale is ~0, so without the scale floor the folded BatchNorm bias is
    # >= 2^31 accumulator steps and to_integer refuses the model.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 64, 64, generator=g)
    net = _with_data_statistics(create("efficientnet_lite0", image_size=64, classes=10), x[:32])
    dead = [1, 5]
    with torch.no_grad():
        net.stem.conv.weight[dead] = 1e-9 * torch.randn(len(dead), 3, 3, 3, generator=g)
        net.stem.bn.running_var[dead] = 0.0  # what training leaves for a dead channel
        net.stem.bn.bias[dead] = torch.tensor([2.0, -1.0])  # one alive (constant), one off
    folded = fold_batchnorm(net)
    qmodel = quantize(folded, uniform_plan(folded, 8, act_bits=8), calib=[x[:32]])
    imodel = to_integer(qmodel, x[:1])
    from integer.test_cnn import simulate

    _, codes, _ = simulate(qmodel, x[32:])
    acc, rec = imodel.run(x[32:], overrides={imodel.points[k]: v for k, v in codes.items()},
                          record=True)  # fmt: skip
    for name, sim in codes.items():  # every layer equals the simulation fed the same codes
        assert int((rec[imodel.points[name]] - sim).abs().max()) <= 1, name
    # the stem's integer weights of the dead channels are 0, the live ones untouched
    stem_w = next(s for s in imodel.steps.values() if hasattr(s, "weight")).weight
    assert int(stem_w[dead].abs().max()) == 0
    live = [c for c in range(32) if c not in dead]
    assert int(stem_w[live].abs().amax((1, 2, 3)).min()) > 0
