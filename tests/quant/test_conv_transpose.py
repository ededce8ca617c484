"""Transposed convolutions (ConvTranspose1d/2d) as quantizable layers, end to end.

Their weight is (in_channels, out_channels / groups, k...), so "per channel" runs along dim 1 (the
output channels, ONNX DequantizeLinear's ``axis=1``): the quantizer, packed storage, size
accounting, sensitivity and the ONNX export all use that axis.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer import LayerQuant, Plan, QuantConfig, load_quantized, quantize
from squeezer.errors import UnsupportedModelError
from squeezer.graph import float_weights, layer_type, quantizable_layers, weight_channel_axis
from squeezer.measure import model_bytes, profile_layers, weight_bytes
from squeezer.quant.modules import QuantConvTranspose1d, QuantConvTranspose2d

pytestmark = pytest.mark.usefixtures("one_thread")

CONV_T = {1: (nn.ConvTranspose1d, F.conv_transpose1d), 2: (nn.ConvTranspose2d, F.conv_transpose2d)}


def _layer(dims: int, *, groups: int = 1, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cls, _ = CONV_T[dims]
    args = {"stride": 2, "padding": 1, "output_padding": 1, "dilation": 1, **kw}
    m = cls(4, 6, 3, groups=groups, **args)
    with torch.no_grad():  # output channels (dim 1) of very different magnitudes
        m.weight.mul_(torch.logspace(-2, 1, m.weight.shape[1]).reshape(1, -1, *[1] * dims))
    return m.eval()


def _input(dims: int, n: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, *([5] * dims), generator=g)


def _per_channel_reference(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel fake quantization of a transposed conv weight, by hand:
    one scale per slice along dim 1."""
    qmax = 2 ** (bits - 1) - 1
    dims = [d for d in range(w.dim()) if d != 1]
    scale = (w.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale, scale


# ------------------------------------------------------------------------------- the layers


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
def test_fake_quant_forward_is_conv_transpose_on_the_quantized_weight(dims, groups):
    net = nn.Sequential(_layer(dims, groups=groups))
    x = _input(dims)
    q = quantize(net, QuantConfig(LayerQuant(bits=4)))
    layer = q[0]
    assert isinstance(layer, QuantConvTranspose1d if dims == 1 else QuantConvTranspose2d)
    assert layer.weight_quantizer.channel_axis == 1
    w = net[0].weight.detach()
    wq, _ = _per_channel_reference(w, 4)
    torch.testing.assert_close(layer.qweight(), wq, rtol=0, atol=1e-6)
    _, conv_t = CONV_T[dims]
    m = net[0]
    args = (m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    with torch.no_grad():
        torch.testing.assert_close(q(x), conv_t(x, wq, m.bias, *args), rtol=0, atol=1e-5)
        # output_size picks the output padding exactly as nn.ConvTranspose does
        for extra in (0, 1):
            size = [(5 - 1) * 2 - 2 + 3 + extra] * dims
            want = conv_t(x, wq, m.bias, m.stride, m.padding, [extra] * dims, m.groups, m.dilation)
            got = layer(x, output_size=size)
            assert list(got.shape[2:]) == size == list(m(x, output_size=size).shape[2:])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2])
def test_input_quantization_feeds_the_transposed_conv(dims):
    net = nn.Sequential(_layer(dims))
    x = _input(dims, n=16)
    q = quantize(net, QuantConfig(LayerQuant(bits=8, act_bits=8)), calib=[x])
    layer, m = q[0], net[0]
    _, conv_t = CONV_T[dims]
    with torch.no_grad():
        want = conv_t(
            layer.input_quantizer(x),
            layer.qweight(),
            m.bias,
            m.stride,
            m.padding,
            m.output_padding,
            m.groups,
            m.dilation,
        )
        torch.testing.assert_close(q(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_error_is_half_a_step_along_dim_1(dims, bits):
    net = nn.Sequential(_layer(dims, groups=2))
    q = quantize(net, QuantConfig(LayerQuant(bits=bits)))
    w, wq = net[0].weight.detach(), q[0].qweight().detach()
    _, scale = _per_channel_reference(w, bits)
    got = q[0].weight_quantizer.scale
    assert got.shape == (w.shape[1], 1, 1)  # one scale per output channel (of a group)
    torch.testing.assert_close(got.reshape(-1), scale.reshape(-1), rtol=1e-6, atol=0)
    assert torch.all((wq - w).abs() <= scale / 2 * (1 + 1e-5))
    # the channels span three decades, yet each one's largest weight takes the largest code
    codes = q[0].weight_quantizer.codes(w).abs()
    peak = codes.amax(dim=[d for d in range(w.dim()) if d != 1])
    assert peak.tolist() == [2 ** (bits - 1) - 1] * w.shape[1]


def test_channel_axis_and_names():
    assert weight_channel_axis(nn.ConvTranspose1d(2, 3, 2)) == 1
    assert weight_channel_axis(nn.Conv1d(2, 3, 2)) == 0
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 3, 2), nn.ConvTranspose3d(3, 1, 1)
    )
    assert list(quantizable_layers(net)) == ["0", "1"]
    assert layer_type(net[1]) == "ConvTranspose2d"
    assert float_weights(net) == {"2": ("ConvTranspose3d", 3)}


def test_packed_storage_round_trips_bit_exactly(tmp_path):
    from squeezer.models import read_state_dict, save_weights
    from squeezer.quant.storage import packed_state_dict

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(1, 2),
        nn.ConvTranspose1d(4 * 22, 3, 2, stride=2),
        nn.ConvTranspose1d(3, 2, 3),
    ).eval()
    x = _input(2, n=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plan = Plan(
        {
            "0": LayerQuant(bits=8, act_bits=8),
            "2": LayerQuant(bits=4),
            "5": LayerQuant(bits=3, granularity="group", group_size=8),
            "6": LayerQuant(bits=2, symmetric=False, granularity="tensor"),
        }
    )
    q = quantize(net, plan, calib=[x])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    save_weights(packed_state_dict(q), tmp_path / "m.safetensors")
    again = load_quantized(net, plan, read_state_dict(tmp_path / "m.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), q.eval()(x), rtol=0, atol=0)
    for k in plan.layers:
        a, b = again.get_submodule(k), q.get_submodule(k)
        assert torch.equal(a.weight, b.qweight())  # the stored weight is the dequantized one
        assert torch.equal(a.weight_quantizer.codes(a.weight), b.weight_quantizer.codes(b.weight))
    size = (tmp_path / "m.safetensors").stat().st_size
    assert size < model_bytes(net, plan) * 1.15 + 4096


def test_bytes_count_one_scale_per_output_channel():
    m = nn.ConvTranspose2d(8, 6, 3, groups=2, bias=False)  # weight (8, 3, 3, 3)
    spec = LayerQuant(bits=4)
    # 216 codes x 4 bits = 108 B, plus 3 scales (dim 1) x 4 B; along dim 0 it would be 8 scales
    assert weight_bytes(m.weight, spec, weight_channel_axis(m)) == 108 + 3 * 4
    assert model_bytes(nn.Sequential(m), Plan({"0": spec})) == 108 + 3 * 4
    from squeezer.costs import plan_costs

    costs = plan_costs(nn.Sequential(m), (2, 4), example=torch.zeros(1, 8, 5, 5))
    assert costs.size_bytes["0"][4] == 108 + 3 * 4 + 8  # and its input's scale and zero point
    planned = Plan({"0": LayerQuant(bits=4, act_bits=8)})
    assert costs.total("size_bytes", {"0": 4}) == model_bytes(nn.Sequential(m), planned)
    assert costs.macs["0"] == 8 * 3 * 9 * 25


def test_sensitivity_perturbs_the_weight_as_the_quantizer_does():
    from squeezer.sensitivity import SensitivityRequest

    net = nn.Sequential(_layer(2, groups=2))
    req = SensitivityRequest(model=net, layers=quantizable_layers(net), bits=(4,))
    q = quantize(net, QuantConfig(LayerQuant(bits=4)))
    torch.testing.assert_close(req.quantized_weight("0", 4), q[0].qweight(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- MACs


def _brute_conv_transpose(x, w, m) -> tuple[torch.Tensor, int]:
    """A scatter loop: every input value times every tap of its group's kernels, added into an
    uncropped output, then cropped by ``padding``; returns (output, multiply-adds per sample)."""
    n, cin = x.shape[:2]
    cout_g, ks = w.shape[1], w.shape[2:]
    gin = cin // m.groups
    ins = x.shape[2:]
    full = [
        (i - 1) * s + d * (k - 1) + 1 + op
        for i, s, d, k, op in zip(ins, m.stride, m.dilation, ks, m.output_padding, strict=True)
    ]
    out = torch.zeros(n, cout_g * m.groups, *full, dtype=torch.float64)
    macs = 0
    for ci, j in itertools.product(range(cin), range(cout_g)):
        co = (ci // gin) * cout_g + j
        for pos in itertools.product(*(range(i) for i in ins)):
            for tap in itertools.product(*(range(k) for k in ks)):
                steps = zip(pos, m.stride, tap, m.dilation, strict=True)
                o = tuple(p * s + t * d for p, s, t, d in steps)
                out[(slice(None), co, *o)] += x[(slice(None), ci, *pos)] * w[(ci, j, *tap)]
                macs += 1
    # padding crops both ends; the output padding, at the end of ``full``, stays inside the crop
    crop = tuple(slice(p, f - p) for p, f in zip(m.padding, full, strict=True))
    out = out[(slice(None), slice(None), *crop)]
    if m.bias is not None:
        out += m.bias.double().reshape(-1, *[1] * len(ins))
    return out, macs


@pytest.mark.parametrize(
    ("dims", "kw"),
    [
        (1, {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2}),
        (1, {"stride": 3, "padding": 0, "output_padding": 0, "dilation": 2}),
        (2, {"stride": 2, "padding": 1, "output_padding": 1, "groups": 1}),
        (2, {"stride": 1, "padding": 2, "output_padding": 0, "dilation": 2, "groups": 2}),
    ],
)
def test_macs_equal_a_brute_force_count(dims, kw):
    groups = kw.pop("groups", 1)
    m = _layer(dims, groups=groups, **kw)
    x = _input(dims, n=2).double()
    ref, macs = _brute_conv_transpose(x, m.weight.detach().double(), m)
    with torch.no_grad():
        torch.testing.assert_close(m.double()(x), ref)  # the loop is the layer
    prof = profile_layers(nn.Sequential(m.float()), x.float())
    assert prof["0"].macs == macs
    assert macs == 4 * (6 // groups) * 3**dims * 5**dims  # in × out/groups × kernel × input size
    assert prof["0"].type == f"ConvTranspose{dims}d" and prof["0"].params == m.weight.numel()


# ------------------------------------------------------------------------------------ export


class EncDec(nn.Module):
    """A small encoder-decoder: a strided conv, a 2-D and a 1-D transposed conv, a linear head."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=groups)
        self.dec1 = nn.ConvTranspose1d(32, 4, 2, stride=2, groups=groups)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.dec(torch.relu(self.enc(x))))  # (N, 4, 8, 8)
        h = torch.relu(self.dec1(h.flatten(1, 2)))  # (N, 4, 16)
        return self.head(h.flatten(1))


@pytest.mark.parametrize(
    "spec",
    [
        LayerQuant(bits=8, act_bits=8),
        LayerQuant(bits=4, act_bits=4, symmetric=False),
        LayerQuant(bits=4, granularity="group", group_size=16, act_bits=8),
        LayerQuant(bits=3, granularity="tensor"),
    ],
    ids=["w8a8", "w4a4-asym", "w4-group16-a8", "w3-tensor"],
)
@pytest.mark.parametrize("groups", [1, 2])
def test_export_runs_in_onnx_runtime(spec, groups, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from squeezer.export import export_onnx

    torch.manual_seed(0)
    net = EncDec(groups).eval()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    specs = {k: spec for k in ("dec", "dec1")}
    specs |= {k: LayerQuant(bits=8, act_bits=spec.act_bits) for k in ("enc", "head")}
    q = quantize(net, Plan(specs), calib=[x])
    rep = export_onnx(q, tmp_path / "m.onnx", x)  # raises if ONNX Runtime disagrees
    kind = "qdq-int8 float-kernel" if spec.act_bits else "qdq-int8 weight-only"
    assert rep.layers["dec"] == rep.layers["dec1"] == kind
    if spec.act_bits is None:  # nothing is rounded but the weights: equal to float round-off
        with torch.no_grad():
            assert rep.max_abs_error <= 1e-5 * float(q(x).abs().max())
    graph = onnx.load(tmp_path / "m.onnx").graph
    convt = [n for n in graph.node if n.op_type == "ConvTranspose"]
    assert len(convt) == 2
    if spec.granularity == "channel":  # per output channel: DequantizeLinear along axis 1
        producers = {o: n for n in graph.node for o in n.output}
        for n in convt:
            dq = producers[n.input[1]]
            assert dq.op_type == "DequantizeLinear"
            assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    # a requantized export (the CLI's default) also runs: the shape Concat of flatten(1, 2)
    rq = export_onnx(q, tmp_path / "rq.onnx", x, requantize=True)
    assert rq.layers["dec"] == kind


def test_integer_reference_names_the_transposed_conv():
    from squeezer.integer import to_integer

    net = EncDec().eval()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = quantize(net, QuantConfig(LayerQuant(bits=8, act_bits=8)), calib=[x])
    with pytest.raises(UnsupportedModelError, match=r"layer 'dec' is a ConvTranspose2d") as err:
        to_integer(q, x)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- CLI

USER_MODEL = """
import torch
from torch import nn


class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.dec1 = nn.ConvTranspose1d(32, 4, 2, stride=2)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.dec(torch.relu(self.enc(x))))
        h = torch.relu(self.dec1(h.flatten(1, 2)))
        return self.head(h.flatten(1))


def make():
    torch.manual_seed(0)
    return EncDec()
"""


def test_cli_compresses_and_exports_an_encoder_decoder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    from squeezer.cli import main

    (tmp_path / "user_encdec.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "c"
    args = ["--data", "digits", "--budget", "bits=4", "--hessian-samples", "64"]
    assert main(["compress", "user_encdec:make", *args, "--out", str(run)]) == 0
    assert "stay in float" not in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert not m.get("float_layers")
    rows = {row["fqn"]: row for row in m["layers"]}
    assert set(rows) == {"enc", "dec", "dec1", "head"}
    assert rows["dec"]["type"] == "ConvTranspose2d" and rows["dec1"]["type"] == "ConvTranspose1d"
    assert rows["dec"]["bits"] < 32 and rows["dec1"]["bits"] < 32
    assert rows["dec"]["macs"] == 8 * 4 * 16 * (4 * 4)  # in × out × kernel × input positions
    assert main(["export", str(run), "--format", "onnx"]) == 0, capsys.readouterr().err
    ex = json.loads((run / "metrics.json").read_text())["export"]
    assert ex["layers"]["dec"] == ex["layers"]["dec1"] == "qdq-int8 float-kernel"
    assert ex["max_abs_error"] <= max(ex["atol"], 2 * ex["quant_error"])
    assert math.isclose(ex["test_metric"], m["after"]["metric"], abs_tol=0.5)
