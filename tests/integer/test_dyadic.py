"""Integer arithmetic of ``squeezer.integer.dyadic`` (HAWQ-V3 arXiv:2011.10680) against exact
oracles: ``math.isqrt`` and ``int.bit_length`` over int64, and rounding of dyadic products checked
in exact rationals (``fractions.Fraction``), every tie included.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezer.errors import ConfigError, DataError
from squeezer.integer import (
    bit_length,
    dyadic_value,
    isqrt,
    requantize,
    shift_round,
    to_dyadic,
)

SETTINGS = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------------------------------------
# Integer square root, bit length


def test_isqrt_exhaustive_small_range_and_around_powers_of_two():
    # every n < 2^18, and a window of 2^12 around each power of two up to 2^62 (where the
    # starting guess 2^ceil(bits/2) changes)
    windows = [torch.arange(2**k - 2**11, 2**k + 2**11) for k in range(19, 63)]
    n = torch.cat([torch.arange(0, 2**18 + 1), *windows, torch.arange(2**63 - 2**12, 2**63 - 1)])
    r = isqrt(n)
    # r² ≤ n < (r+1)², written with divisions so that nothing overflows int64 near 2^63
    assert bool(((r <= n // r.clamp(min=1)) & (r + 1 > n // (r + 1))).all())


def test_isqrt_around_every_kind_of_square():
    k = torch.cat([torch.arange(0, 3000), torch.tensor([2**31 - 1, 2**31, 3037000499])])
    for d in (-1, 0, 1):
        n = (k * k + d).clamp(min=0)
        expected = [math.isqrt(v) for v in n.tolist()]
        assert isqrt(n).tolist() == expected
    assert int(isqrt(torch.tensor(2**63 - 1))) == math.isqrt(2**63 - 1) == 3037000499


@SETTINGS
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50))
def test_isqrt_matches_math_isqrt_over_int64(values):
    assert isqrt(torch.tensor(values)).tolist() == [math.isqrt(v) for v in values]


def test_isqrt_refuses_negative_and_float():
    with pytest.raises(DataError):
        isqrt(torch.tensor([4, -1]))
    with pytest.raises(DataError):
        isqrt(torch.tensor([4.0]))


@SETTINGS
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50))
def test_bit_length(values):
    assert bit_length(torch.tensor(values)).tolist() == [v.bit_length() for v in values]


# ------------------------------------------------------------------------------------------------
# Dyadic numbers and requantization


@SETTINGS
@given(
    st.integers(1, 31).flatmap(
        lambda bits: st.tuples(
            st.floats(2.0 ** (bits - 63), 2.0 ** (bits - 1), exclude_max=True), st.just(bits)
        )
    )
)
def test_to_dyadic_error_bound(m_bits):
    m, bits = m_bits
    b, c = to_dyadic(m, bits=bits)
    assert b.dtype == c.dtype == torch.int64
    assert 2 ** (bits - 1) <= int(b) < 2**bits and 0 <= int(c) <= 62
    assert abs(Fraction(int(b), 2 ** int(c)) - Fraction(m)) <= Fraction(m) * Fraction(1, 2**bits)


def test_to_dyadic_edge_cases():
    b, c = to_dyadic(torch.tensor([0.0, 1.0, 2.0**-70, 1 - 2.0**-40]))
    assert dyadic_value(b, c).tolist()[:2] == [0.0, 1.0]
    assert int(c[2]) == 62 and abs(float(dyadic_value(b[2], c[2])) - 2.0**-70) <= 2.0**-63
    assert float(dyadic_value(b[3], c[3])) == 1.0  # the mantissa rounded up and renormalised
    with pytest.raises(ConfigError):
        to_dyadic(2.0**31)
    with pytest.raises(ConfigError):
        to_dyadic(-0.5)
    with pytest.raises(ConfigError):
        to_dyadic(0.5, bits=32)


def _round_exact(x: Fraction, mode: str) -> int:
    fl = math.floor(x)
    frac = x - fl
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and (mode == "half_up" or fl % 2)):
        return fl + 1
    return fl


@SETTINGS
@given(
    st.lists(st.integers(-(2**60), 2**60), min_size=1, max_size=30),
    st.integers(0, 62),
    st.sampled_from(["half_even", "half_up"]),
)
def test_shift_round_is_exact_rounding(values, shift, mode):
    got = shift_round(torch.tensor(values), shift, mode).tolist()
    assert got == [_round_exact(Fraction(v, 2**shift), mode) for v in values]


@pytest.mark.parametrize("mode", ["half_even", "half_up"])
def test_shift_round_every_small_value_and_tie(mode):
    values = list(range(-300, 301))
    for shift in range(0, 6):
        got = shift_round(torch.tensor(values), shift, mode).tolist()
        assert got == [_round_exact(Fraction(v, 2**shift), mode) for v in values]


def test_shift_right_is_floor_for_negative_ints():
    # shift_round relies on >> being arithmetic (floor division by 2^k) for signed tensors
    x = torch.tensor([-5, -4, -1, 0, 3], dtype=torch.int64)
    assert (x >> 1).tolist() == [-3, -2, -1, 0, 1]


@SETTINGS
@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=30),
    st.floats(1e-6, 10.0),
    st.integers(-10, 10),
    st.sampled_from(["half_even", "half_up"]),
)
def test_requantize_exact_and_close_to_real_multiplier(accs, m, zp, mode):
    b, c = to_dyadic(m)
    acc = torch.tensor(accs, dtype=torch.int32)
    out = requantize(acc, b, c, zp, -128, 127, rounding=mode)
    assert out.dtype == torch.int64
    exact = [
        min(127, max(-128, _round_exact(Fraction(a * int(b), 2 ** int(c)), mode) + zp))
        for a in accs
    ]
    assert out.tolist() == exact
    # against the real multiplier: within half a step plus the dyadic error, before clamping
    for a, o in zip(accs, out.tolist(), strict=True):
        real = a * m + zp
        if -128 <= real <= 127:
            assert abs(o - real) <= 0.5 + abs(a) * m * 2**-31 + 1e-9


def test_requantize_per_channel_and_overflow_guard():
    acc = torch.tensor([[100, -100], [100, -100]], dtype=torch.int32)
    b, c = to_dyadic(torch.tensor([[0.5], [0.25]]))
    assert requantize(acc, b, c).tolist() == [[50, -50], [25, -25]]
    with pytest.raises(DataError):
        requantize(torch.tensor([2**40]), *to_dyadic(0.5))
    big = requantize(
        torch.tensor([2**40]), *to_dyadic(2.0**-40, bits=16), qmin=-(2**31), qmax=2**31
    )
    assert big.tolist() == [1]
