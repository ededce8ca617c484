import torch
from torch import nn

from squeezer import LayerQuant, Plan, QuantConfig, load_quantized, quantize
from squeezer.data import evaluate
from squeezer.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear
from squeezer.templates import uniform_plan


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_quantize_leaves_input_model_bit_identical(trained_digits_cnn, digits):
    net, _ = trained_digits_cnn
    before = _state(net)
    training = net.training
    q = quantize(net, uniform_plan(net, 4, act_bits=8), calib=digits.calibration_batches())
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training == training
    assert all(type(m) not in (QuantConv2d, QuantLinear) for m in net.modules())
    assert any(isinstance(m, QuantConv2d) for m in q.modules())


def test_8bit_and_4bit_accuracy(trained_digits_cnn, digits):
    net, info = trained_digits_cnn
    calib = digits.calibration_batches()
    acc8 = evaluate(
        quantize(net, uniform_plan(net, 8), calib=calib), digits.test_batches(), digits.task
    )
    acc4 = evaluate(
        quantize(net, uniform_plan(net, 4), calib=calib), digits.test_batches(), digits.task
    )
    assert abs(acc8 - info["top1"]) <= 0.5
    assert info["top1"] - acc4 <= 3.0


def test_embedding_and_mlp_quantize_and_reload():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(16 * 4, 8))
    plan = Plan({"0": LayerQuant(bits=4), "2": LayerQuant(bits=8, act_bits=8)})
    x = torch.randint(0, 50, (32, 4))
    q = quantize(net, plan, calib=[x])
    assert isinstance(q[0], QuantEmbedding) and isinstance(q[2], QuantLinear)
    rel = (q(x) - net(x)).norm() / net(x).norm()
    assert rel < 0.15
    again = load_quantized(net, plan, q.state_dict())
    torch.testing.assert_close(again(x), q(x), rtol=0, atol=0)


def test_activation_quant_without_calib_is_a_clear_error():
    import pytest

    from squeezer.errors import ConfigError

    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="calibration data"):
        quantize(net, QuantConfig(LayerQuant(bits=8, act_bits=8)))


def test_float_layers_in_plan_stay_float():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    q = quantize(net, Plan({"0": LayerQuant(bits=32), "1": LayerQuant(bits=4)}))
    assert type(q[0]) is nn.Linear and isinstance(q[1], QuantLinear)


def test_packed_storage_round_trip_and_size(trained_digits_cnn, digits, tmp_path):
    from squeezer.measure import model_bytes
    from squeezer.models import read_state_dict, save_weights
    from squeezer.quant.storage import packed_state_dict

    net, _ = trained_digits_cnn
    plan = Plan(
        {
            "conv1": LayerQuant(bits=8, act_bits=8),
            "conv2": LayerQuant(bits=4),
            "conv3": LayerQuant(bits=3, granularity="group", group_size=64),
            "fc1": LayerQuant(bits=2, symmetric=False),
        }
    )
    q = quantize(net, plan, calib=digits.calibration_batches())
    save_weights(packed_state_dict(q), tmp_path / "m.safetensors")
    again = load_quantized(net, plan, read_state_dict(tmp_path / "m.safetensors"))
    x = digits.x_test[:64]
    torch.testing.assert_close(again.eval()(x), q.eval()(x), rtol=0, atol=0)
    # the file is close to the accounted size (safetensors adds a JSON header)
    size = (tmp_path / "m.safetensors").stat().st_size
    assert size < model_bytes(net, plan) * 1.15 + 4096


def test_hessian_batches_are_a_seeded_training_subset(digits):
    """The loss increase reported next to ΣΩ is measured on hessian_batches, which
    analyze_for_plan also feeds to the Hessian: a seeded subset of the training split."""

    a = torch.cat([x for x, _ in digits.analysis_batches(200, seed=3)])
    b = torch.cat([x for x, _ in digits.analysis_batches(200, seed=3)])
    c = torch.cat([x for x, _ in digits.analysis_batches(200, seed=4)])
    assert a.shape[0] == 200 and torch.equal(a, b) and not torch.equal(a, c)
    train = digits.x_train.flatten(1)
    assert all(bool((train == row).all(1).any()) for row in a.flatten(1))  # rows of x_train
