"""Stored weight codes (``squeezer.export.codes``) against their definitions: packed nibbles unpack
to the codes, folding a per-row factor into the codes dequantizes to the scaled weight (to float32
round-off), and each code range maps to the ONNX integer type that holds it."""

from __future__ import annotations

import numpy as np
import pytest

from squeezer.export.codes import _code_dtype, _pack, _WeightCodes


@pytest.mark.parametrize("k", [7, 8])
def test_pack_4bit_unpacks_low_nibble_first(k):
    u = np.random.default_rng(0).integers(0, 16, (3, k)).astype(np.uint8)
    p = _pack(u, 4)
    assert p.dtype == np.uint8 and p.shape == (3, (k + 1) // 2)
    unpacked = np.stack([p & 0xF, p >> 4], axis=-1).reshape(3, -1)[:, :k]
    assert np.array_equal(unpacked, u)
    assert np.array_equal(_pack(u, 8), u)


@pytest.mark.parametrize(("qmin", "qmax", "groups"), [(-8, 7, 1), (0, 15, 2), (-128, 127, 4)])
def test_scaled_codes_dequantize_to_the_scaled_weight(qmin, qmax, groups):
    rng = np.random.default_rng(1)
    rows, k = 5, 8
    w = _WeightCodes(
        codes=rng.integers(qmin, qmax + 1, (rows, k)),
        scale=rng.uniform(0.01, 0.1, (rows, groups)).astype(np.float32),
        zero_point=rng.integers(qmin, qmax + 1, (rows, groups)),
        qmin=qmin,
        qmax=qmax,
        per_tensor=False,
    )
    f = np.array([1.5, -0.5, 2.0, -3.0, 0.25])
    s = w.scaled(f)
    assert s.codes.min() >= qmin and s.codes.max() <= qmax  # mirrored codes stay in range
    expected = w.dequantized() * f[:, None]
    assert np.allclose(s.dequantized(), expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(w.codes[f > 0], s.codes[f > 0])


def test_code_dtype_is_the_narrowest_onnx_integer_type():
    assert _code_dtype(-128, 127) is np.int8 and _code_dtype(-8, 7) is np.int8
    assert _code_dtype(0, 255) is np.uint8
    assert _code_dtype(-2048, 2047) is None and _code_dtype(-1, 255) is None
