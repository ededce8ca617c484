"""Bias correction (squeezer.quant.bias_correction) against plain-torch oracles."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer import LayerQuant, QuantConfig, load_quantized, quantize
from squeezer.errors import ConfigError
from squeezer.integer import fold_batchnorm, to_integer
from squeezer.quant.bias_correction import correct_bias
from squeezer.quant.storage import packed_state_dict
from squeezer.templates import uniform_plan


def _hand_round(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain torch: symmetric per-output-channel rounding, s = max|w| / (2^(b-1) - 1)."""
    q = 2 ** (bits - 1) - 1
    s = (w.abs().flatten(1).amax(1).clamp_min(1e-30) / q).view(-1, *[1] * (w.dim() - 1))
    return torch.round(w / s).clamp(-q, q) * s


def _positive_inputs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=g) + 0.5 for _ in range(3)]  # mean far from 0


@torch.no_grad()
def test_linear_weight_only_correction_is_the_oracle_and_restores_the_mean():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 8))  # quantize swaps layers inside a model
    lin = net[0]
    calib = _positive_inputs(50, 32)
    q = quantize(net, QuantConfig(LayerQuant(bits=3, act_bits=None)), calib=calib,
                 bias_correction=True)  # fmt: skip
    x = torch.cat(calib)
    expected = (x @ (_hand_round(lin.weight, 3) - lin.weight).T).mean(0)  # E[(Q(W) - W) x]
    torch.testing.assert_close(lin.bias - q[0].bias, expected, rtol=1e-5, atol=1e-6)
    err = q(x) - lin(x)
    assert float(err.mean(0).abs().max()) < 1e-5  # corrected output mean = float output mean
    plain = quantize(net, QuantConfig(LayerQuant(bits=3, act_bits=None)))
    assert float((plain(x) - lin(x)).mean(0).abs().max()) > 100 * float(err.mean(0).abs().max())


@torch.no_grad()
def test_conv_with_quantized_input_and_no_bias_gets_one_restoring_each_channel_mean():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1, bias=False))
    conv = net[0]
    calib = _positive_inputs(8, 6, 10, 10, seed=1)
    cfg = QuantConfig(LayerQuant(bits=4, act_bits=4))
    qnet = quantize(net, cfg, calib=calib, bias_correction=True)
    q = qnet[0]
    assert conv.bias is None and q.bias is not None and q.bias.shape == (5,)
    x = torch.cat(calib)
    # Oracle in plain torch: the layer's own fake-quantized input and hand-rounded weight.
    qp = q.input_quantizer.qparams()
    xq = (torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
          - qp.zero_point) * qp.scale  # fmt: skip
    expected = (F.conv2d(xq, _hand_round(conv.weight, 4), padding=1)
                - conv(x)).mean((0, 2, 3))  # fmt: skip
    torch.testing.assert_close(-q.bias, expected, rtol=1e-4, atol=1e-6)
    assert float((q(x) - conv(x)).mean((0, 2, 3)).abs().max()) < 1e-5


@torch.no_grad()
def test_each_layer_is_measured_on_the_float_models_inputs():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    calib = _positive_inputs(40, 16, seed=2)
    q = quantize(net, QuantConfig(LayerQuant(bits=3, act_bits=None)), calib=calib,
                 bias_correction=True)  # fmt: skip
    x = torch.cat(calib)
    h = net[1](net[0](x))  # the float hidden activations, not the quantized ones
    expected = (h @ (_hand_round(net[2].weight, 3) - net[2].weight).T).mean(0)
    torch.testing.assert_close(net[2].bias - q[2].bias, expected, rtol=1e-5, atol=1e-6)


def test_the_users_model_is_not_mutated_and_calib_is_required(trained_digits_cnn, digits):
    net, _ = trained_digits_cnn
    before = {k: v.clone() for k, v in net.state_dict().items()}
    training = net.training
    q = quantize(net, uniform_plan(net, 8, act_bits=8), calib=digits.calibration_batches(256),
                 bias_correction=True)  # fmt: skip
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert net.training == training
    assert set(q.state_dict()) - set(before) - {k for k in q.state_dict() if "quantizer" in k} \
        == {f"{n}.bias" for n, m in net.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is None}  # fmt: skip
    with pytest.raises(ConfigError, match="calibration data"):
        quantize(net, uniform_plan(net, 8, act_bits=None), bias_correction=True)
    with pytest.raises(ConfigError, match="no calibration batches"):
        correct_bias(q, [])


@torch.no_grad()
def test_added_biases_survive_the_packed_save_and_reload(trained_digits_cnn, digits):
    net, _ = trained_digits_cnn
    plan = uniform_plan(net, 4, act_bits=8)
    q = quantize(net, plan, calib=digits.calibration_batches(256), bias_correction=True).eval()
    back = load_quantized(net, plan, packed_state_dict(q)).eval()
    x = digits.x_test[:64]
    assert torch.equal(q(x), back(x))


@torch.no_grad()
def test_to_integer_uses_the_corrected_bias(trained_digits_cnn, digits):
    net = fold_batchnorm(trained_digits_cnn[0].eval())
    calib = digits.calibration_batches(256)
    plan = uniform_plan(net, 4, act_bits=8)
    q = quantize(net, plan, calib=calib, bias_correction=True).eval()
    plain = quantize(net, plan, calib=calib).eval()
    x = digits.x_test[:128]
    imodel = to_integer(q, x[:1])
    step = float(q(x).max() - q(x).min()) / 255
    assert float((imodel(x) - q(x)).abs().median()) <= step  # the integer model is q, not plain
    assert float((imodel(x) - plain(x)).abs().median()) > float((imodel(x) - q(x)).abs().median())


def test_default_is_on_for_conv_nets_and_off_for_transformers_with_a_patch_conv():
    from torch import nn

    from squeezer.pipeline import default_bias_correction
    from squeezer.zoo import create

    assert default_bias_correction(create("digits_cnn"))
    assert not default_bias_correction(create("digits_transformer"))
    vit_like = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), nn.LayerNorm(4))
    assert not default_bias_correction(vit_like)
    assert not default_bias_correction(nn.Sequential(nn.Linear(4, 4)))
