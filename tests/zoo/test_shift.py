"""The shift operation against its oracle (a depthwise convolution whose kernels are one-hot at each
group's offset), its gradient, and its life through quantization and ONNX export."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import squeezer as sq
from squeezer.zoo.shift import Shift, channel_groups, offsets

pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot_conv(shift: Shift, x: torch.Tensor) -> torch.Tensor:
    """The oracle: a depthwise k x k convolution, channel c's kernel 1 at its group's offset."""
    k, d = shift.kernel_size, shift.dilation
    w = torch.zeros(shift.channels, 1, k, k, dtype=x.dtype)
    for c0, c1, dy, dx in shift.groups:
        w[c0:c1, 0, k // 2 + dy, k // 2 + dx] = 1
    return F.conv2d(x, w, padding=d * (k // 2), dilation=d, groups=shift.channels)


CASES = [(9, 3, "square", 1), (20, 3, "square", 1), (7, 3, "cross", 1), (30, 5, "square", 1),
         (11, 3, "square", 2), (4, 3, "square", 1), (1, 3, "cross", 1)]  # fmt: skip


@pytest.mark.parametrize(("channels", "k", "pattern", "dilation"), CASES)
def test_shift_equals_a_one_hot_depthwise_convolution(channels, k, pattern, dilation):
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(3, channels, 7, 6, generator=g, dtype=torch.float64)
    s = Shift(channels, k, pattern, dilation)
    assert torch.equal(s(x), one_hot_conv(s, x))  # exact: both only move values


def test_groups_cover_every_channel_once_with_the_remainder_unshifted():
    for c in range(1, 40):
        groups = channel_groups(c, 3)
        assert groups[0][0] == 0 and groups[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))
        centre = next(gr for gr in groups if gr[2:] == (0, 0))
        assert centre[1] - centre[0] == c // 9 + c % 9
    assert len(offsets(5)) == 25 and offsets(3, "cross")[2] == (0, 0)
    with pytest.raises(ValueError, match="odd"):
        offsets(4)
    with pytest.raises(ValueError, match="pattern"):
        Shift(9, 3, "diamond")


def test_the_gradient_is_the_adjoint_shift():
    g = torch.Generator().manual_seed(0)
    s = Shift(18)
    small = torch.randn(1, 9, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Shift(9), (small,))
    x = torch.randn(2, 18, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # <shift(x), y> = <x, shift^T(y)>: the backward of the shift is the oracle's transpose
    y = torch.randn(2, 18, 5, 5, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((s(x) * y).sum(), x)
    xr = x.detach().requires_grad_()
    (gref,) = torch.autograd.grad((one_hot_conv(s, xr) * y).sum(), xr)
    assert torch.equal(gx, gref)


class _CSC(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 18, 1)
        self.relu = nn.ReLU()
        self.shift = Shift(18)
        self.conv2 = nn.Conv2d(18, 4, 1)

    def forward(self, x):
        return self.conv2(self.shift(self.relu(self.conv1(x))))


def test_quantization_leaves_the_shift_as_it_is():
    torch.manual_seed(0)
    net = _CSC().eval()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    q = sq.quantize(net, sq.QuantConfig(sq.LayerQuant(bits=8, act_bits=8)), calib=[x])
    assert type(q.shift) is Shift and type(net.conv1) is nn.Conv2d  # the caller's net untouched
    assert set(sq.quantizable_layers(net)) == {"conv1", "conv2"}
    # only the two convolutions are quantized; the net still computes what the float one does
    ref = net(x)
    assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_onnx_export_holds_split_pad_concat_for_the_shift(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    torch.manual_seed(0)
    net = _CSC().eval()
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    q = sq.quantize(net, sq.QuantConfig(sq.LayerQuant(bits=8, act_bits=8)), calib=[x])
    report = sq.export_onnx(q, tmp_path / "csc.onnx", x)  # verified in ONNX Runtime
    assert report.max_abs_error is not None
    ops = {n.op_type for n in onnx.load(tmp_path / "csc.onnx").graph.node}
    assert {"Split", "Pad", "Concat"} <= ops
    assert not ops & {"Loop", "If", "Scan"}  # static slices, no control flow


def test_to_integer_passes_the_shift_through():
    torch.manual_seed(0)
    net = _CSC().eval()
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    q = sq.quantize(net, sq.QuantConfig(sq.LayerQuant(bits=8, act_bits=8)), calib=[x])
    imodel = sq.to_integer(q, x[:1])
    assert (imodel(x) - q(x)).abs().max() < 1e-3
