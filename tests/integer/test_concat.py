"""Integer-only channel splits, zero padding and concatenation (the shift operation, SqueezeNet's
fire module, ShuffleNet-style units) against the fake-quant simulation they came from.

The three ops only move integers (an accumulator's 0 is a real 0) and carry each channel's scale
with it, so they add no rounding of their own. The oracle is the one of ``test_cnn.py``: layer by
layer every code equals the simulation's except at float32 near-ties. End to end, on these small
seeded nets no code differs at all: each output is within one step of the last layer's
accumulator grid (``s_x · s_w`` of its channel; what remains is the bias rounding and the
simulation's float32 round-off, measured ≤ 0.013 step), and the predicted classes are the same on
every input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer import quantize
from squeezer.errors import UnsupportedModelError
from squeezer.integer import IntegerModel, fold_batchnorm, to_integer
from squeezer.integer.steps import IntConcat, IntNarrow, IntPad
from squeezer.templates import uniform_plan
from squeezer.zoo.diracdeltanet import DiracDeltaUnit
from squeezer.zoo.squeezenet import Fire

from .batchnorm import bn_stats, randomize_bn
from .test_cnn import check_against_simulation, simulate

pytestmark = pytest.mark.usefixtures("one_thread")


def compile_w8a8(net: nn.Module, x: torch.Tensor, fold: bool = True):
    """The W8A8 simulation of ``net`` calibrated on ``x`` and its integer program."""
    base = fold_batchnorm(net) if fold else net
    qmodel = quantize(base, uniform_plan(base, 8, act_bits=8), calib=[x])
    return qmodel, to_integer(qmodel, x[:1])


def check_exact(qmodel: nn.Module, imodel: IntegerModel, x: torch.Tensor, last: str) -> float:
    """Layer by layer as in test_cnn.py; end to end no code differs, the outputs are within one
    step of the ``last`` layer's accumulator grid and the argmax agrees everywhere. Returns the
    largest difference in those steps."""
    check_against_simulation(qmodel, imodel, x)
    _, codes, _ = simulate(qmodel, x)
    _, rec = imodel.run(x, record=True)
    for name, sim in codes.items():
        assert torch.equal(rec[imodel.points[name]], sim), name
    layer = qmodel.get_submodule(last)
    lsb = (layer.input_quantizer.scale * layer.weight_quantizer.scale.reshape(-1)).double()
    with torch.no_grad():
        y = qmodel(x).double()
    y_int = imodel(x).double()
    steps = float(((y_int - y).abs() / lsb).max())
    assert steps <= 1.0
    assert torch.equal(y_int.argmax(1), y.argmax(1))
    return steps


class _SplitBranches(nn.Module):
    """A split of the channels, a different conv-BN-ReLU on each part, the parts concatenated
    (their channel scales differ part by part) and a conv across the seam."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(10, 6, 3)
        self.fc = nn.Linear(6, 5)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        parts = torch.split(self.relu0(self.conv0(x)), [3, 5], dim=1)
        a = F.relu(self.bn_a(self.conv_a(parts[0])))
        b = F.relu(self.bn_b(self.conv_b(parts[1])))
        h = F.relu(self.head(torch.cat([a, b], dim=1)))
        return self.fc(torch.flatten(self.gap(h), 1))


class _Padded(nn.Module):
    """The shift pattern (method split, pads with negative widths, cat), a residual add, a pad
    that grows the map before an unpadded conv and one that crops after it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 5)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        p = h.split(4, 1)
        s = torch.cat([F.pad(p[0], (1, -1, -2, 2)), F.pad(p[1], (-2, 2, 1, -1))], 1)
        g = F.pad(s + h, (1, 1, 2, 0))  # 8 x 8 -> 10 x 10, zeros on the border
        c = F.pad(F.relu(self.conv2(g)), (-1, -1, -1, -1))  # 8 x 8 -> 6 x 6
        return self.fc(torch.flatten(self.gap(c), 1))


class _FireNet(nn.Module):
    """SqueezeNet in small: a stem, two fire modules (squeeze, expand 1 x 1 and 3 x 3, cat) with
    max pooling between, a 1 x 1 classifier conv, ReLU and global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fire2 = Fire(8, 4, 6, 6)
        self.fire3 = Fire(12, 6, 8, 8)
        self.classifier = nn.Conv2d(16, 5, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.fire3(self.pool(self.fire2(self.pool(F.relu(self.conv1(x))))))
        return torch.flatten(self.gap(F.relu(self.classifier(h))), 1)


class _DiracUnits(nn.Module):
    """DiracDeltaNet's units: split, shift, concatenation and the quarter rotation of channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.units = nn.Sequential(DiracDeltaUnit(8, 8, False), DiracDeltaUnit(8, 16, True))
        self.fc = nn.Linear(16, 5)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(self.units(self.stem(x))), 1))


def _seeded(cls, seed: int, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(seed)
    return bn_stats(randomize_bn(cls(), seed), x)


@pytest.mark.parametrize("fold", [True, False])
def test_split_branches_concatenated(fold):
    x = torch.randn(192, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    qmodel, imodel = compile_w8a8(_seeded(_SplitBranches, 10, x), x[:128], fold)
    kinds = [type(m) for m in imodel.steps.values()]
    assert kinds.count(IntNarrow) == 2 and kinds.count(IntConcat) == 1
    check_exact(qmodel, imodel, x[128:], "fc")


def test_padding_with_negative_widths_shifts_and_crops():
    x = torch.randn(192, 2, 8, 8, generator=torch.Generator().manual_seed(11))
    qmodel, imodel = compile_w8a8(_seeded(_Padded, 11, x), x[:128])
    assert [type(m) for m in imodel.steps.values()].count(IntPad) == 4
    check_exact(qmodel, imodel, x[128:], "fc")


def test_fire_modules():
    x = torch.randn(192, 3, 17, 17, generator=torch.Generator().manual_seed(12))
    qmodel, imodel = compile_w8a8(_seeded(_FireNet, 12, x), x[:128])
    check_exact(qmodel, imodel, x[128:], "classifier")


@pytest.mark.parametrize("fold", [True, False])
def test_dirac_delta_units(fold):
    x = torch.randn(192, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    qmodel, imodel = compile_w8a8(_seeded(_DiracUnits, 13, x), x[:128], fold)
    check_exact(qmodel, imodel, x[128:], "fc")


class _Bad(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.conv, self.op = nn.Conv2d(4, 4, 1), op

    def forward(self, x):
        return self.op(self.conv(x))


@pytest.mark.parametrize(
    ("op", "match"),
    [
        (lambda h: torch.cat(torch.split(h, [2, 2], dim=2), dim=2), "channels"),
        (lambda h: torch.cat([h, h], dim=3), "concatenation of the channels"),
        (lambda h: F.pad(h, (0, 0, 0, 0, 1, 1)), "spatial"),
        (lambda h: F.pad(h, (1, 1, 1, 1), mode="reflect"), "zero padding"),
        (lambda h: F.pad(h, (1, 1), value=1.0), "zero padding"),
    ],
)
def test_unsupported_split_pad_cat_say_why(op, match):
    x = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    qmodel = quantize(_Bad(op), uniform_plan(_Bad(op), 8, act_bits=8), calib=[x])
    with pytest.raises(UnsupportedModelError, match=match):
        to_integer(qmodel, x[:1])


class _CatInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv(torch.cat([x, x], dim=1))


def test_concatenating_the_float_input_says_to_quantize_first():
    x = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    qmodel = quantize(_CatInput(), uniform_plan(_CatInput(), 8, act_bits=8), calib=[x])
    with pytest.raises(UnsupportedModelError, match="first layer to quantize the input"):
        to_integer(qmodel, x[:1])
