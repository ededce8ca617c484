"""Dyadic numbers and integer requantization: the arithmetic of integer-only inference.

HAWQ-V3 (Yao et al., arXiv:2011.10680, Sec. 3.3) replaces every real rescaling factor ``m`` (for a
layer, ``m = s_in · s_w / s_out``) by a *dyadic number* ``b / 2^c`` with an integer ``b`` and a shift
``c``, so requantizing an int32 accumulator needs one integer multiply and one arithmetic right
shift. I-BERT (Kim et al., arXiv:2101.01321) uses the same device and an integer square root by
Newton's method for LayerNorm; both live here.

Every function on activations works on integer tensors only (int64 intermediates); floats appear
only in :func:`to_dyadic`, which turns a real multiplier into integer constants ahead of time.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, DataError

#: Rounding modes of :func:`shift_round` and :func:`requantize`.
ROUNDINGS = ("half_even", "half_up")

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def as_int64(q: torch.Tensor, name: str = "input") -> torch.Tensor:
    """``q`` as int64, refusing floating tensors (which would silently break integer-only math)."""
    if not isinstance(q, torch.Tensor) or q.dtype not in _INT_DTYPES:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise DataError(
            f"{name} must be an integer tensor (int8/uint8/int16/int32/int64), got {got}; "
            "quantize it first, e.g. torch.round(x / scale).to(torch.int32)"
        )
    return q.to(torch.int64)


def bit_length(n: torch.Tensor) -> torch.Tensor:
    """Elementwise number of bits of a non-negative int64 tensor (0 for 0), by integer shifts.

    Example:
        >>> bit_length(torch.tensor([0, 1, 2, 255, 256, 2**62]))
        tensor([ 0,  1,  2,  8,  9, 63])
    """
    t = as_int64(n, "n")
    bits = torch.zeros_like(t)
    for s in (32, 16, 8, 4, 2, 1):  # binary search for the top set bit
        hi = t >> s
        has = hi > 0
        t = torch.where(has, hi, t)
        bits = bits + has.to(torch.int64) * s
    return bits + (t > 0).to(torch.int64)


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(sqrt(n))`` of every entry of a non-negative integer tensor (up to 2^63 − 1).

    Newton's method on integers (I-BERT, Alg. 4): start at ``x0 = 2^ceil(bits(n)/2) ≥ sqrt(n)`` and
    iterate ``x ← floor((x + floor(n / x)) / 2)`` while it decreases. From any start above the root
    the iterates decrease strictly until they reach ``floor(sqrt(n))`` (AM-GM keeps every iterate
    ≥ floor(sqrt(n))), and from there the next iterate does not decrease, so the stopping value is
    exact. The start is within a factor 2 of the root, so quadratic convergence needs ≤ 7 steps.

    Example:
        >>> isqrt(torch.tensor([0, 1, 3, 4, 99, 2**62]))
        tensor([         0,          1,          1,          2,          9, 2147483648])
    """
    n = as_int64(n, "n")
    if bool((n < 0).any()):
        raise DataError("isqrt takes non-negative integers; pass a variance or a sum of squares")
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    for _ in range(64):  # never more than ~7 rounds; the bound only guards against a bug
        y = (x + n // x.clamp(min=1)) >> 1
        smaller = y < x
        if not bool(smaller.any()):
            break
        x = torch.where(smaller, y, x)
    return x


def to_dyadic(m: float | torch.Tensor, *, bits: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """A positive real multiplier as a dyadic number ``b / 2^c`` (integer ``b``, shift ``c``).

    ``b`` has exactly ``bits`` bits (``2^(bits−1) ≤ b < 2^bits``, so it fits int32 for
    ``bits ≤ 31``) and ``0 ≤ c ≤ 62``. The error bound is
    ``|b / 2^c − m| ≤ 2^−bits · m`` for ``2^(bits−63) ≤ m < 2^(bits−1)``; a smaller ``m`` gets
    ``c = 62`` and an absolute error ≤ 2^−63, and ``m = 0`` gives ``(0, 0)``. This is the one
    function here that touches floats: it runs once, ahead of inference, on scale ratios.

    Args:
        m: multiplier(s) ≥ 0, a float or a tensor of any shape (e.g. one per output channel).
        bits: bits of ``b``, 1 to 31.

    Returns:
        ``(b, c)``: int64 tensors of ``m``'s shape.

    Example:
        >>> b, c = to_dyadic(0.1)
        >>> int(b), int(c), abs(int(b) / 2 ** int(c) - 0.1) <= 0.1 * 2**-31
        (1717986918, 34, True)
    """
    if not 1 <= int(bits) <= 31:
        raise ConfigError(f"bits must be between 1 and 31 (b must fit int32), got {bits}")
    m = torch.as_tensor(m, dtype=torch.float64)
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ConfigError(
            "a dyadic multiplier must be finite and ≥ 0; check the scales it came from"
        )
    mant, exp = torch.frexp(m)  # m = mant · 2^exp with mant in [0.5, 1)
    b = torch.round(mant * 2.0**bits).to(torch.int64)
    c = bits - exp.to(torch.int64)
    carry = b == 2**bits  # mant rounded up to 1: renormalise
    b = torch.where(carry, b >> 1, b)
    c = torch.where(carry, c - 1, c)
    if bool((c < 0).any()):
        raise ConfigError(
            f"multiplier {float(m.max()):g} is too large for a {bits}-bit dyadic number "
            f"(at most 2^{bits - 1}); rescale the output or use more bits"
        )
    tiny = c > 62
    b = torch.where(tiny, torch.round(m * 2.0**62).to(torch.int64), b)
    c = torch.where(tiny, torch.full_like(c, 62), c)
    zero = m == 0
    return torch.where(zero, 0, b), torch.where(zero, 0, c)


def dyadic_value(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The real value ``b / 2^c`` in float64 (bookkeeping and tests, never in an integer forward)."""
    return torch.as_tensor(b, dtype=torch.float64) * torch.pow(2.0, -torch.as_tensor(c).double())


def shift_round(
    x: torch.Tensor, shift: torch.Tensor | int, rounding: str = "half_even"
) -> torch.Tensor:
    """``x / 2^shift`` rounded to an integer, by shifts only (``shift`` ≥ 0, broadcastable).

    ``half_even`` rounds ties to the even integer (as ``torch.round`` does, so the integer path
    agrees with float fake-quantization at exact ties); ``half_up`` rounds ties towards +∞
    (``(x + 2^(shift−1)) >> shift``, gemmlowp/TFLite style). Right shifts of signed integers are
    arithmetic, i.e. floor division by 2^shift.

    Example:
        >>> x = torch.tensor([-3, -2, -1, 1, 2, 3, 5])
        >>> shift_round(x, 1), shift_round(x, 1, "half_up")
        (tensor([-2, -1,  0,  0,  1,  2,  2]), tensor([-1, -1,  0,  1,  1,  2,  3]))
    """
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    x = as_int64(x, "x")
    shift = torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    if bool((shift < 0).any()) or bool((shift > 62).any()):
        raise ConfigError("shifts must be between 0 and 62")
    half = (torch.ones_like(shift) << shift) >> 1  # 2^(shift-1), and 0 for shift 0
    if rounding == "half_up":
        return (x + half) >> shift
    # floor((x + half − 1 + odd) / 2^shift), odd = the lowest bit of the floor: exact ties go up only
    # from odd floors, everything else rounds to nearest (and shift 0 adds nothing).
    odd = (x >> shift) & 1
    return (x + torch.where(shift > 0, half - 1 + odd, 0)) >> shift


def requantize(
    acc: torch.Tensor,
    multiplier: torch.Tensor | int,
    shift: torch.Tensor | int,
    zero_point: torch.Tensor | int = 0,
    qmin: int = -128,
    qmax: int = 127,
    *,
    rounding: str = "half_even",
) -> torch.Tensor:
    """Integer requantization ``clamp(round(acc · b / 2^c) + zero_point, qmin, qmax)``.

    The HAWQ-V3 rescale of an integer accumulator to the next layer's codes: one int64 multiply,
    one rounding shift, an add and a clamp. ``multiplier``/``shift`` come from :func:`to_dyadic`
    and broadcast against ``acc`` (shape them ``(C, 1, 1)`` for per-channel conv outputs).

    Args:
        acc: integer accumulator (int32 or int64 tensor).
        multiplier, shift: the dyadic ``b`` and ``c`` (``b ≥ 0``, ``0 ≤ c ≤ 62``).
        zero_point: added after rounding.
        qmin, qmax: output code range.
        rounding: ``half_even`` (default, agrees with ``torch.round``) or ``half_up``.

    Returns:
        int64 codes in ``[qmin, qmax]``.

    Raises:
        DataError: if ``|acc| · b`` could exceed 2^62 (use fewer multiplier bits).

    Example:
        >>> b, c = to_dyadic(0.25)
        >>> requantize(torch.tensor([-6, -2, 2, 6, 1000], dtype=torch.int32), b, c)
        tensor([ -2,   0,   0,   2, 127])
    """
    acc = as_int64(acc, "acc")
    b = torch.as_tensor(multiplier, dtype=torch.int64, device=acc.device)
    if bool((b < 0).any()):
        raise ConfigError("a dyadic multiplier must be ≥ 0; fold a negative sign into the weights")
    amax = int(acc.abs().max()) if acc.numel() else 0
    if amax * int(b.max() if b.numel() else 0) >= 2**62:
        raise DataError(
            f"|acc| up to {amax} times multiplier {int(b.max())} overflows int64; "
            f"build the multiplier with fewer bits, e.g. to_dyadic(m, bits={max(1, 61 - amax.bit_length())})"
        )
    out = shift_round(acc * b, shift, rounding) + torch.as_tensor(zero_point, dtype=torch.int64)
    return out.clamp(qmin, qmax)
