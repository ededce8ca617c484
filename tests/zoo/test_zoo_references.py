"""Each architecture against its published figures: parameter counts exactly (or to the rounding
of the source), MACs within the stated tolerance in the source's own counting convention."""

import pytest
import torch
from torch import nn

from squeezer.measure import profile_layers
from squeezer.zoo import MODELS, create, list_models
from squeezer.zoo.reference import Reference, count_macs
from squeezer.zoo.shift import Shift
from squeezer.zoo.shiftresnet import EXPANSIONS

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCED = [n for n in list_models() if MODELS[n].reference is not None]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_the_papers_architectures_all_carry_references():
    expected = {"squeezenet1_0", "squeezenet1_1", "sqnxt23", "sqnxt23v5", "resnet20_cifar"}
    expected |= {f"shiftresnet{d}_e{e}" for d in (20, 56) for e in EXPANSIONS}
    assert expected <= set(REFERENCED)


@pytest.mark.parametrize("name", REFERENCED)
def test_parameter_count_matches_the_reference(name):
    ref = MODELS[name].reference
    got = _params(create(name, **ref.kwargs))
    assert abs(got - ref.params) <= ref.params_tol, (got, ref.params, ref.source)


@pytest.mark.parametrize("name", [n for n in REFERENCED if MODELS[n].reference.macs])
def test_macs_match_the_reference(name):
    entry = MODELS[name]
    ref = entry.reference
    got = count_macs(create(name, **ref.kwargs), entry.input_shape, ref.counting)
    assert got == pytest.approx(ref.macs, rel=ref.macs_rtol), (got, ref.macs, ref.source)


# pytorchcv's model table for the other width multipliers (parameters; MACs in its convention)
WIDTHS = [
    ("sqnxt23", 1.5, 1_511_824, 552.39e6),
    ("sqnxt23v5", 1.5, 1_953_616, 550.97e6),
    ("sqnxt23", 2.0, 2_583_752, 898.48e6),
]


@pytest.mark.parametrize(("name", "width", "params", "macs"), WIDTHS)
def test_squeezenext_width_multipliers_match_pytorchcv(name, width, params, macs):
    m = create(name, classes=1000, width=width)
    assert _params(m) == params
    assert count_macs(m, (3, 224, 224), "pytorchcv") == pytest.approx(macs, rel=1e-4)


def test_conv_macs_of_squeezenext_are_below_pytorchcvs_figure():
    # the 287.28M of pytorchcv's table also charges BatchNorm, ReLU and pooling; the conv and
    # linear multiply-accumulates alone (what profile_layers reports) are 3.9% fewer
    m = create("sqnxt23", classes=1000)
    macs = count_macs(m, (3, 224, 224))
    assert macs == pytest.approx(275.92e6, rel=1e-4)
    assert count_macs(m, (3, 224, 224), "pytorchcv") == pytest.approx(287.28e6, rel=1e-4)


def test_count_macs_pytorchcv_convention_by_hand():
    # conv 1->2, 3x3 on 5x5 (bias): 162 MACs = 324 flops; BN on 18 values: 72; ReLU: 18;
    # 2x2 max pool on a 3x3 map -> 1x1 per channel: 2 x 4 = 8; linear 2->3 with bias: 12
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2, 3),
    )  # fmt: skip
    assert count_macs(net, (1, 5, 5)) == 162 + 6
    assert count_macs(net, (1, 5, 5), "pytorchcv") == (324 + 72 + 18 + 8 + 12) / 2
    with pytest.raises(ValueError, match="counting"):
        count_macs(net, (1, 5, 5), "flops")
    with pytest.raises(ValueError, match="counting"):
        Reference("x", counting="flops")


def test_shift_has_no_parameters_and_no_macs():
    m = create("shiftresnet20_e3")
    shifts = [s for s in m.modules() if isinstance(s, Shift)]
    assert len(shifts) == 9 and all(_params(s) == 0 for s in shifts)
    # every counted layer is a conv or linear: the shifts add nothing to the MACs
    prof = profile_layers(m, torch.zeros(1, 3, 32, 32))
    assert {p.type for p in prof.values()} == {"Conv2d", "Linear"}


@pytest.mark.parametrize("depth", [20, 56])
def test_shiftresnet_trades_parameters_for_expansion_like_the_paper(depth):
    params = [_params(create(f"shiftresnet{depth}_e{e}")) for e in EXPANSIONS]
    assert params == sorted(params)
    # at expansion 9 the CSC modules hold about as many weights as the 3x3 convs they replace
    resnet = _params(create(f"resnet{depth}_cifar"))
    assert params[-1] == pytest.approx(resnet, rel=0.03)
    assert resnet / params[0] > 7.5  # the paper's 7.8x (ResNet-20) and 8.4x (ResNet-56)
