"""The form of 8-bit weight codes in the ONNX file (``export_onnx(weight_codes=...)``).

Oracle: the dequantized weights. The uint8 form (codes + 128, zero point 128) holds the very values
of the int8 form, so ONNX Runtime must agree with squeezer as closely in both where its kernels are
exact; on x86 without VNNI its uint8 × int8 kernels add pairs of products in int16 and saturate, a
net built to saturate them (inputs at code 255, weights at code 127) shows it, and the uint8 form
does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from squeezer import LayerQuant, QuantConfig, quantize
from squeezer.errors import ConfigError, ExportError

pytest.importorskip("onnxruntime")
from squeezer.export import export_onnx  # noqa: E402
from squeezer.export.onnx import weight_code_forms  # noqa: E402
from squeezer.export.runtime import (  # noqa: E402
    _saturates,
    ort_feeds,
    ort_session,
    saturating_layers,
    u8s8_saturates,
)

from .test_onnx import optimized_ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _saturating_net(bits: int = 8):
    """A 1x1 conv over 16 channels whose inputs quantize near code 255 and weights to code 127:
    every pair of products is 2 · 255 · 127 > 32,767 (at ``bits`` 7 the weights are at code 63:
    2 · 255 · 63 = 32,130 fits)."""
    torch.manual_seed(2)  # seeds the second conv: unseeded, the exactness margin varied by run
    net = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        net[0].weight.fill_(0.05)
        net[0].weight[1].mul_(-1)
        net[0].bias.zero_()
    g = torch.Generator().manual_seed(0)
    x = 0.9 + 0.1 * torch.rand(32, 16, 4, 4, generator=g)
    x[0, :, 0, 0] = 0.0  # the input range starts at 0: zero point 0, codes up to 255
    q = quantize(net, QuantConfig(LayerQuant(bits=bits, act_bits=8)), calib=[x])
    return q, x


def _dequantized_weights(path) -> dict[str, np.ndarray]:
    """{codes initializer: (codes − zero point) × scale} of each DequantizeLinear on a weight."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith(".w_q"):
            q, s = inits[n.input[0]], inits[n.input[1]]
            z = inits[n.input[2]] if len(n.input) > 2 else np.zeros_like(s, np.int64)
            shape = (-1,) + (1,) * (q.ndim - 1) if s.ndim else ()
            out[n.input[0]] = (q.astype(np.int64) - z.reshape(shape)) * s.reshape(shape)
    return out


def test_uint8_codes_hold_the_int8_values_and_run_exactly(tmp_path):
    import onnx

    q, x = _saturating_net()
    rep = export_onnx(q, tmp_path / "u8.onnx", x, weight_codes="uint8")
    assert rep.weight_codes == "uint8"
    assert rep.median_sample_error <= 1e-5 * float(q(x).detach().abs().max())  # exact up to float rounding
    inits = {i.name: i for i in onnx.load(tmp_path / "u8.onnx").graph.initializer}
    assert inits["0.w_q"].data_type == onnx.TensorProto.UINT8
    int8 = export_onnx(q, tmp_path / "s8.onnx", x, weight_codes="int8", verify=False)
    assert int8.weight_codes == "int8"
    assert inits["0.w_q"].data_type != onnx.load(tmp_path / "s8.onnx").graph.initializer[0].data_type
    a, b = _dequantized_weights(tmp_path / "u8.onnx"), _dequantized_weights(tmp_path / "s8.onnx")
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ops = optimized_ops(tmp_path / "u8.onnx", tmp_path)  # the same integer kernels as int8
    assert "QLinearConv" in ops and ops == optimized_ops(tmp_path / "s8.onnx", tmp_path)


def test_int8_codes_saturate_exactly_where_the_cpu_says_so(tmp_path):
    q, x = _saturating_net()
    if u8s8_saturates():
        with pytest.raises(ExportError, match="disagrees.*no VNNI.*weight-codes uint8"):
            export_onnx(q, tmp_path / "s8.onnx", x, weight_codes="int8")
        assert not (tmp_path / "s8.onnx").exists()
    else:
        rep = export_onnx(q, tmp_path / "s8.onnx", x, weight_codes="int8")
        assert rep.median_sample_error <= 1e-5 * float(q(x).detach().abs().max())
    # "auto" falls back to uint8 exactly where int8 fails the check
    auto = export_onnx(q, tmp_path / "auto.onnx", x)
    assert auto.weight_codes == ("uint8" if u8s8_saturates() else "int8")
    assert auto.median_sample_error <= 1e-5 * float(q(x).detach().abs().max())


def test_seven_bit_weights_take_int8_codes_directly_and_run_exactly(tmp_path, monkeypatch):
    """7-bit weights (codes ±63) cannot saturate the uint8 × int8 kernels, so "auto" writes int8
    codes without trying (or checking) another form, on this CPU as on any; 8-bit ones still go
    through the check where the CPU saturates."""
    import onnx

    import squeezer.export.onnx as export_mod

    q7, x = _saturating_net(bits=7)
    q8, _ = _saturating_net(bits=8)
    assert saturating_layers(q7) == [] and saturating_layers(q8) == ["0", "2"]
    monkeypatch.setattr(export_mod, "u8s8_saturates", lambda: True)  # a CPU without VNNI
    assert weight_code_forms("auto", qmodel=q7) == ["int8"]
    assert weight_code_forms("auto", verify=False, qmodel=q7) == ["int8"]
    assert weight_code_forms("auto", qmodel=q8) == ["int8", "uint8"]
    assert weight_code_forms("auto", verify=False, qmodel=q8) == ["uint8"]
    monkeypatch.undo()
    # float rounding of the rescale can flip one code of the 4-channel hidden map (3e-5 relative
    # measured); saturated sums move outputs by tens of percent (8-bit int8 codes, below)
    scale = 1e-4 * float(q7(x).detach().abs().max())
    rep = export_onnx(q7, tmp_path / "w7.onnx", x, pack=False)
    assert rep.weight_codes == "int8" and rep.median_sample_error <= scale
    unchecked = export_onnx(q7, tmp_path / "w7u.onnx", x, pack=False, verify=False)
    assert unchecked.weight_codes == "int8"
    inits = {i.name: i for i in onnx.load(tmp_path / "w7u.onnx").graph.initializer}
    assert inits["0.w_q"].data_type == onnx.TensorProto.INT8
    sess = ort_session(tmp_path / "w7u.onnx", threads=1)  # the unchecked file runs exactly too
    out = sess.run(None, ort_feeds(x, sess))[0]
    assert np.abs(out - q7(x).detach().numpy()).max() <= scale
    if u8s8_saturates():  # where 8-bit codes saturate, "auto" does not keep int8 for them
        assert export_onnx(q8, tmp_path / "w8.onnx", x).weight_codes == "uint8"
        assert export_onnx(q8, tmp_path / "w8u.onnx", x, verify=False).weight_codes == "uint8"
        export_onnx(q8, tmp_path / "w8s.onnx", x, weight_codes="int8", verify=False)
        sess = ort_session(tmp_path / "w8s.onnx", threads=1)
        wrong, ref8 = sess.run(None, ort_feeds(x, sess))[0], q8(x).detach().numpy()
        assert np.abs(wrong - ref8).max() > 0.01 * float(np.abs(ref8).max())


def test_saturating_layers_skips_what_runs_without_int8_kernels():
    """Float inputs, group-wise codes, uint8 (asymmetric 8-bit) codes and narrow asymmetric ones
    cannot saturate; 7-bit asymmetric codes (0..127, stored as int8) can."""
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    cases = [
        (LayerQuant(bits=8), []),
        (LayerQuant(bits=8, act_bits=8, granularity="group", group_size=8), []),
        (LayerQuant(bits=8, act_bits=8, symmetric=False), []),
        (LayerQuant(bits=6, act_bits=8, symmetric=False), []),
        (LayerQuant(bits=7, act_bits=8, symmetric=False), ["0", "2"]),
        (LayerQuant(bits=8, act_bits=4), ["0", "2"]),
    ]
    for spec, expected in cases:
        assert saturating_layers(quantize(net, QuantConfig(spec), calib=[x])) == expected, spec


def test_token_linears_fuse_with_uint8_codes(tmp_path):
    """MatMulIntegerToFloat takes uint8 weight codes and their zero points as well."""
    import onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(64, 5, 16, generator=torch.Generator().manual_seed(1))
    q = quantize(net, QuantConfig(LayerQuant(bits=8, act_bits=8, act_symmetric=False)), calib=[x])
    rep = export_onnx(q, tmp_path / "m.onnx", x, weight_codes="uint8")
    fused = [n for n in onnx.load(tmp_path / "m.onnx").graph.node
             if n.op_type == "MatMulIntegerToFloat"]  # fmt: skip
    assert len(fused) == 2 and all(len(n.input) == 7 for n in fused)
    assert rep.max_abs_error <= rep.atol


def test_auto_keeps_int8_where_it_cannot_saturate(tmp_path):
    """Inputs within the lower half of their range (codes <= 128): 2 · 128 · 127 < 32,767, so the
    int8 file passes the check on any CPU and "auto" keeps that faster form."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x = 0.5 * torch.rand(64, 16, generator=g)
    calib = torch.cat([x, torch.ones(1, 16)])  # the range is [0, 1]
    q = quantize(net, QuantConfig(LayerQuant(bits=8, act_bits=8)), calib=[calib])
    rep = export_onnx(q, tmp_path / "auto.onnx", x)
    assert rep.weight_codes == "int8"
    assert rep.median_sample_error <= 1e-5 * float(q(x).detach().abs().max())


def test_narrow_codes_keep_int8():
    """Codes within ±64 cannot saturate (2 · 255 · 64 < 32,767): they keep the int8 form, which
    the sub-8-bit packing expects."""
    from squeezer.export.codes import _WeightCodes
    from squeezer.export.layers import _Act
    from squeezer.export.weights import _unsigned

    class _L:
        act = _Act(scale=0.1, zero_point=0, qmin=0, qmax=255)

    w = _WeightCodes(np.array([[-8, 7]]), np.ones((1, 1), np.float32), np.zeros((1, 1), np.int64),
                     -8, 7, per_tensor=False)  # fmt: skip
    assert _unsigned(w, _L()) is w
    wide = _WeightCodes(np.array([[-127, 127]]), w.scale, w.zero_point, -127, 127, False)
    u = _unsigned(wide, _L())
    assert (u.qmin, u.qmax) == (1, 255) and u.codes.tolist() == [[1, 255]]
    np.testing.assert_array_equal(u.dequantized(), wide.dequantized())


def test_cpu_rule_and_bad_values():
    assert _saturates("x86_64", "flags : fpu avx2 fma") is True
    assert _saturates("x86_64", "flags : avx2 avx512f avx512_vnni") is False
    assert _saturates("AMD64", "flags : avx2 avx_vnni") is False
    assert _saturates("x86_64", None) is True  # cannot tell: the safe side
    assert _saturates("aarch64", None) is False
    saturates = u8s8_saturates()
    assert weight_code_forms("auto") == (["int8", "uint8"] if saturates else ["int8"])
    assert weight_code_forms("auto", verify=False) == (["uint8"] if saturates else ["int8"])
    assert weight_code_forms("int8") == ["int8"] and weight_code_forms("uint8") == ["uint8"]
    with pytest.raises(ConfigError, match="weight_codes"):
        weight_code_forms("u4")


def test_activation_codes_become_uint8_with_the_same_values():
    """With uint8 weight codes every 8-bit activation quantizer writes uint8 codes too: ONNX
    Runtime's int8 × int8 kernels on x86 without VNNI add 128 to the activation and multiply as
    uint8 × int8, which saturates as well (a 4-bit asymmetric activation, codes 0..15 stored as
    int8, before a QGemm with 8-bit weights moved outputs by up to 38 output steps, the median
    sample by 22)."""
    from squeezer.export.codes import _unsigned_act
    from squeezer.export.layers import _Act

    def values(a):
        return [(c - a.zero_point) * a.scale for c in (a.qmin, a.qmax)]

    for act in (_Act(0.1, 0, -128, 127), _Act(0.1, 3, 0, 15), _Act(0.5, -2, -8, 7)):
        u = _unsigned_act(act)
        assert u.qmin >= 0 and u.qmax <= 255 and u.zero_point == act.zero_point + 128
        assert values(u) == values(act)
    kept = _Act(0.1, 7, 0, 255)
    assert _unsigned_act(kept) is kept and _unsigned_act(None) is None
