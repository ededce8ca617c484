"""I-BERT's integer kernels (arXiv:2101.01321) against exact and float oracles.

Bounds used below, and where they come from:
* i-GELU vs exact GELU: 0.0182 + 3e-4·|x|. The I-BERT polynomial's own worst case is 0.01815
  (dense grid, at x ≈ 2.35; the paper reports 1.8e-2); rounding the constant b at an erf-argument
  step ≤ 2^-10 moves erf by ≤ 2|a|·|b|·2^-11 ≈ 5e-4, i.e. GELU by ≤ 2.6e-4·|x|.
  Against the float polynomial itself (isolating the integer implementation): |x|·2^-11.
* i-exp vs exp: relative 3.2e-3 (the polynomial's worst relative error on (−ln2, 0], 3.1e-3; the
  paper reports 1.9e-3 absolute) + 3.5e-4·(1 + z) (ln2 held to 2^-11 relative, z = ⌊−x/ln2⌋),
  plus half an output step.
* i-softmax: 2^-B (rounding and the clamp at 2^B − 1) + 8e-3·p (twice the exp's relative error,
  numerator and denominator, with margin) + 1e-6.
* i-LayerNorm: s_g/2·(|x̂| + 1) (weight and bias codes) + max|γ|·2^-frac_bits (output rounding and
  the √n constant) + 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezer.errors import ConfigError, DataError
from squeezer.integer import (
    i_exp,
    i_gelu,
    i_layernorm,
    i_softmax,
    requantize,
    to_dyadic,
)
from squeezer.integer.kernels import EXP_A, EXP_B, EXP_C, GELU_A, GELU_B

SETTINGS = settings(max_examples=60, deadline=None)
INT8 = st.integers(-128, 127)
SCALES = st.floats(1e-3, 0.5)  # realistic int8 activation scales: ranges from ±0.13 to ±64


def int8_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int8)


# ------------------------------------------------------------------------------------------------
# I-BERT kernels


def gelu_poly(x: torch.Tensor) -> torch.Tensor:
    """I-BERT's float GELU approximation (the function the integer kernel implements)."""
    u = x / math.sqrt(2.0)
    erf = torch.sign(u) * (GELU_A * (torch.clamp(u.abs(), max=-GELU_B) + GELU_B) ** 2 + 1)
    return x / 2 * (1 + erf)


def test_gelu_polynomial_error_is_the_papers():
    x = torch.linspace(-8, 8, 160001, dtype=torch.float64)
    err = (gelu_poly(x) - F.gelu(x)).abs().max()
    assert 0.0180 < err < 0.0182


@SETTINGS
@given(st.lists(INT8, min_size=1, max_size=64), SCALES)
def test_i_gelu_against_gelu(values, scale):
    out, s_out = i_gelu(int8_tensor(values), scale)
    assert out.dtype == torch.int64
    x = torch.tensor(values, dtype=torch.float64) * scale
    got = out.double() * s_out
    assert bool(((got - F.gelu(x)).abs() <= 0.0182 + 3e-4 * x.abs()).all())
    assert bool(((got - gelu_poly(x)).abs() <= 0.26 * 2**-10 * x.abs() + 1e-12).all())


# The worst case for constant rounding: the erf argument's step just under 2^-10 after refinement.
WORST_GELU_SCALES = [math.sqrt(2) * 2.0 ** (j - 10) * 0.999 for j in (0, 3, 7)]


@pytest.mark.parametrize("scale", [1e-4, 1e-3, 0.01, 0.05, 0.2, 1.0, *WORST_GELU_SCALES])
def test_i_gelu_every_int8_code(scale):
    q = torch.arange(-128, 128, dtype=torch.int8)
    out, s_out = i_gelu(q, scale)
    x = q.double() * scale
    got = out.double() * s_out
    assert bool(((got - F.gelu(x)).abs() <= 0.0182 + 3e-4 * x.abs()).all())
    # rounding b at step ≤ 2^-10 moves erf by ≤ |a||b|·2^-10, GELU by ≤ 0.2555·2^-10·|x|
    assert bool(((got - gelu_poly(x)).abs() <= 0.26 * 2**-10 * x.abs() + 1e-12).all())
    assert bool((out.abs() <= q.long().abs() * 2**23).all())


def test_i_gelu_int32_inputs_at_a_fine_scale():
    # I-BERT's regime: int32 accumulators with a small scale
    q = torch.linspace(-(2**20), 2**20, 4001).round().to(torch.int32)
    out, s_out = i_gelu(q, 5e-6)
    x = q.double() * 5e-6
    assert bool(((out.double() * s_out - F.gelu(x)).abs() <= 0.0182 + 3e-4 * x.abs()).all())


def exp_bound(x: torch.Tensor, s_out: float) -> torch.Tensor:
    z = torch.floor(-x / math.log(2))
    return x.exp() * (3.2e-3 + 3.5e-4 * (1 + z)) + s_out / 2 + 1e-9


@SETTINGS
@given(st.lists(st.integers(-128, 0), min_size=1, max_size=64), SCALES)
def test_i_exp_against_exp(values, scale):
    out, s_out = i_exp(int8_tensor(values), scale)
    x = torch.tensor(values, dtype=torch.float64) * scale
    assert bool(((out.double() * s_out - x.exp()).abs() <= exp_bound(x, s_out)).all())


# The worst case for constant rounding: a step just under ln2·2^-10 after refinement.
WORST_EXP_SCALES = [math.log(2) * 2.0 ** (j - 10) * 0.999 for j in (0, 4, 9)]


@pytest.mark.parametrize("scale", [1e-5, 1e-3, 0.03, 0.3, *WORST_EXP_SCALES])
def test_i_exp_matches_its_polynomial(scale):
    q = -torch.arange(0, 200_000, 7) if scale < 1e-3 else -torch.arange(0, 129)
    q = q[q.double() * scale >= -30 * math.log(2)]  # the kernel clamps below -30 ln2
    out, s_out = i_exp(q, scale)
    x = q.double() * scale
    z = torch.floor(-x / math.log(2))
    p = x + z * math.log(2)
    ref = (EXP_A * (p + EXP_B) ** 2 + EXP_C) * 2.0**-z
    # with the argument's step h ≤ ln2·2^-10: rounding b costs ≤ 0.49·h relative, holding ln2 to
    # h/2 costs z·h/2 relative, and the final shift half an output step
    h = math.log(2) * 2**-10
    assert bool(((out.double() * s_out - ref).abs() <= ref * h * (0.5 + z / 2) + s_out / 2).all())
    assert bool(((out.double() * s_out - x.exp()).abs() <= exp_bound(x, s_out)).all())
    assert int(out.max()) < 2**23


def test_i_exp_refuses_positive_inputs():
    with pytest.raises(DataError):
        i_exp(torch.tensor([1, -1]), 0.1)


@SETTINGS
@given(
    st.lists(st.lists(INT8, min_size=6, max_size=6), min_size=1, max_size=8),
    SCALES,
    st.sampled_from([8, 16]),
)
def test_i_softmax_against_softmax(rows, scale, out_bits):
    q = torch.tensor(rows, dtype=torch.int8)
    out, s_out = i_softmax(q, scale, out_bits=out_bits)
    assert s_out == 2.0**-out_bits
    assert int(out.min()) >= 0 and int(out.max()) <= 2**out_bits - 1
    ref = torch.softmax(q.double() * scale, dim=-1)
    assert bool(((out.double() * s_out - ref).abs() <= 2**-out_bits + 8e-3 * ref + 1e-6).all())


@SETTINGS
@given(st.lists(INT8, min_size=2, max_size=16), SCALES, st.integers(-1000, 1000))
def test_i_softmax_is_exactly_shift_invariant(values, scale, offset):
    q = torch.tensor(values)
    assert torch.equal(i_softmax(q, scale)[0], i_softmax(q + offset, scale)[0])


def test_i_softmax_int32_scores_along_dim0():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-(2**20), 2**20, (32, 5), generator=g, dtype=torch.int32)
    out, s_out = i_softmax(q, 1e-5, dim=0, out_bits=16)
    ref = torch.softmax(q.double() * 1e-5, dim=0)
    assert bool(((out.double() * s_out - ref).abs() <= 2**-16 + 8e-3 * ref + 1e-6).all())


def ln_bound(x, gamma, s_g, frac_bits=12):
    norm = F.layer_norm(x, x.shape[-1:], eps=1e-5)
    gmax = float(gamma.abs().max()) if gamma is not None else 1.0
    return s_g / 2 * (norm.abs() + 1) + gmax * 2.0**-frac_bits + 1e-6


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(INT8, min_size=12, max_size=12), min_size=1, max_size=3),
    SCALES,
    st.integers(0, 2**31),
)
def test_i_layernorm_against_layernorm(rows, scale, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.tensor(rows, dtype=torch.int8)
    x = q.double() * scale
    gamma = torch.randn(12, generator=g, dtype=torch.float64)
    beta = torch.randn(12, generator=g, dtype=torch.float64)
    out, s_out = i_layernorm(q, scale, gamma, beta)
    s_g = float(gamma.abs().max()) / 2047
    ref = F.layer_norm(x, (12,), gamma, beta, eps=1e-5)
    assert bool(((out.double() * s_out - ref).abs() <= ln_bound(x, gamma, s_g)).all())
    assert int(out.abs().max()) < 2**31
    plain, s_plain = i_layernorm(q, scale)
    ref = F.layer_norm(x, (12,), eps=1e-5)
    assert bool(((plain.double() * s_plain - ref).abs() <= ln_bound(x, None, 0.0)).all())


@pytest.mark.parametrize(
    ("dtype", "lo", "hi", "scale", "n"),
    [
        (torch.int8, -128, 128, 0.05, 384),
        (torch.int32, -(2**31), 2**31 - 1, 1e-8, 384),
        (torch.int32, -(2**20), 2**20, 1e-4, 4096),
        (torch.int8, -2, 2, 0.5, 8),
    ],
)
def test_i_layernorm_ranges_and_row_lengths(dtype, lo, hi, scale, n):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(lo, hi, (4, n), generator=g, dtype=torch.int64).to(dtype)
    out, s_out = i_layernorm(q, scale)
    x = q.double() * scale
    ref = F.layer_norm(x, (n,), eps=1e-5)
    assert bool(((out.double() * s_out - ref).abs() <= ln_bound(x, None, 0.0)).all())


def test_i_layernorm_constant_rows_and_eps():
    q = torch.tensor([[5, 5, 5, 5], [0, 0, 0, 1]], dtype=torch.int8)
    beta = torch.tensor([0.5, -1.0, 0.0, 2.0])
    out, s_out = i_layernorm(q, 0.1, torch.ones(4), beta)
    assert torch.allclose(out[0].double() * s_out, beta.double(), atol=1e-3)
    # eps dominates a tiny variance: a scale of 1e-4 gives var ≈ 1.9e-9 ≪ eps = 1e-5
    out, s_out = i_layernorm(q, 1e-4)
    ref = F.layer_norm(q.double() * 1e-4, (4,), eps=1e-5)
    assert torch.allclose(out.double() * s_out, ref, atol=2**-12)


@SETTINGS
@given(st.lists(INT8, min_size=2, max_size=16), SCALES, st.integers(-(2**20), 2**20))
def test_i_layernorm_is_exactly_shift_invariant(values, scale, offset):
    q = torch.tensor(values)
    assert torch.equal(i_layernorm(q, scale)[0], i_layernorm(q + offset, scale)[0])


def test_kernels_refuse_float_inputs_and_bad_scales():
    for kernel in (i_gelu, i_softmax, i_layernorm):
        with pytest.raises(DataError):
            kernel(torch.tensor([[0.5, 1.0]]), 0.1)
        with pytest.raises(ConfigError):
            kernel(torch.tensor([[1, 2]]), 0.0)


def test_activations_never_become_floats(float_leaks):
    q = torch.tensor([[-100, -3, 0, 7, 120, 55]], dtype=torch.int8)
    with float_leaks() as mode:
        outs = [
            i_gelu(q, 0.05)[0],
            i_exp(q.long() - 120, 0.05)[0],
            i_softmax(q, 0.05)[0],
            i_layernorm(q, 0.05)[0],
            i_layernorm(q, 0.05, torch.randn(6, generator=torch.Generator().manual_seed(0)))[0],
            requantize(q.long() * 1000, *to_dyadic(0.001)),
        ]
    assert mode.leaks == []
    assert all(o.dtype == torch.int64 for o in outs)


def test_leak_detector_can_fail(float_leaks):
    with float_leaks() as mode:
        torch.tensor([1, 2]) * 0.5
    assert mode.leaks


def test_softmax_fine_scales_work_and_too_fine_ones_are_refused():
    """Attention scores with a tiny step stay accurate down to 3e-9; finer steps would overflow
    int64 in the polynomial and get a clear error instead."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    for s in (1e-6, 3e-9):
        out, so = i_softmax(torch.round(x / s).long(), s)
        assert (out.double() * so - torch.softmax(x, -1)).abs().max() < 2**-8 + 8e-3
    with pytest.raises(ConfigError, match="too fine for int64"):
        i_softmax(torch.round(x / 1e-10).long(), 1e-10)
