"""I-BERT's integer-only kernels: GELU, exp, softmax and LayerNorm on integer tensors.

I-BERT (Kim et al., "I-BERT: Integer-only BERT Quantization", arXiv:2101.01321) evaluates the
non-linear operations of a transformer with integer arithmetic only, by choosing approximations
that are low-order polynomials (whose coefficients fold into integer constants) plus shifts:

* i-GELU: ``erf(x) ≈ sgn(x) · [a (min(|x|, −b) + b)² + 1]`` with ``a = −0.2888, b = −1.769``
  (Sec. 3.4), so ``GELU(x) = x/2 · (1 + erf(x/√2))`` is one square, one multiply and adds.
* i-exp: ``x = −z·ln2 + p`` with ``p ∈ (−ln2, 0]``, ``exp(p) ≈ 0.3585 (p + 1.353)² + 0.344``
  and ``exp(x) = exp(p) >> z`` (Sec. 3.5); i-softmax divides by the integer row sum.
* i-LayerNorm: the standard deviation by an integer square root (Newton's method, Sec. 3.6).

Every kernel takes ``(q, scale)`` (the real input is ``scale · q``) and returns ``(q_out,
scale_out)``. Activations stay integer tensors throughout (int64 intermediates); the floats that
remain are Python numbers computed from the scales, folded into integer constants before any
tensor is touched (the tests check this with a dispatch hook). Deviations from the paper, each for
accuracy at coarse int8 scales and each still integer-only: constants are rounded to nearest
rather than floored; a coarse input is first shifted left (``q · 2^k``, exact) so that the
polynomial constants are represented to ~2^−10; LayerNorm centres exactly with ``n·q − Σq``
instead of a rounded mean and normalises each row's magnitude by a shift before the square root;
LayerNorm keeps ``eps``.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, DataError
from .dyadic import as_int64, bit_length, isqrt, shift_round

# I-BERT's polynomial coefficients (arXiv:2101.01321, Eq. 8 and Eq. 13).
GELU_A, GELU_B = -0.2888, -1.769
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344
LN2 = math.log(2.0)

#: Finest step the polynomial arguments are brought to (by an exact left shift) before the
#: constants are rounded: constant-rounding errors stay below ~2^-11 of the argument.
_FINE = 2.0**-10
#: Width the polynomial values are cut to (by a rounding right shift) so outputs stay bounded.
_POLY_BITS = 22


def _scale(scale: float | torch.Tensor) -> float:
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ConfigError(f"scale must be a positive finite number, got {scale!r}")
    return s


def _refine(s: float, target: float) -> int:
    """The left shift k ≥ 0 that brings a step ``s`` to at most ``target``."""
    return max(0, math.ceil(math.log2(s / target) - 1e-12))


def _cut(v: float) -> int:
    """Bits to drop from values up to ``v`` so they keep ``_POLY_BITS`` bits."""
    return max(0, int(abs(v)).bit_length() - _POLY_BITS)


def i_gelu(q: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """Integer-only GELU (I-BERT Alg. 2) of the real input ``scale · q``.

    Accuracy (``tests/test_integer_kernels.py``): ``|scale_out · out − GELU(scale · q)| ≤ 0.0182 +
    3e-4 · |x|``; 0.01815 is the polynomial's own worst case (at x ≈ 2.35), the rest is the
    rounding of the constants. Output codes satisfy ``|out| ≤ |q| · 2^23``.

    Args:
        q: integer tensor of any shape (int8 to int64).
        scale: the input's positive real scale.

    Returns:
        ``(out, scale_out)``: int64 codes and their real scale.

    Example:
        >>> out, s = i_gelu(torch.tensor([-100, -10, 0, 10, 100], dtype=torch.int8), 0.03)
        >>> [round(v, 3) for v in (out.double() * s).tolist()]
        [0.0, -0.105, 0.0, 0.195, 3.0]
    """
    q = as_int64(q, "q")
    s = _scale(scale)
    # The erf argument x/√2 has step s/√2; refine it by an exact shift of q.
    k = _refine(s / math.sqrt(2.0), _FINE)
    s_e = s / math.sqrt(2.0) / 2**k
    u = q << k
    q_b = round(GELU_B / s_e)  # negative
    q_one = round(1.0 / (-GELU_A * s_e * s_e))  # "1" at the polynomial's scale |a| s_e²
    # erf(x/√2) ≈ sgn · (1 − |a| (min(|x|, −b) + b)²), at scale s_L = |a| s_e² (kept positive).
    clipped = torch.clamp(u.abs(), max=-q_b)
    q_erf = torch.sign(u) * (q_one - (clipped + q_b) ** 2)
    r = _cut(2 * q_one)  # keep 1 + erf to _POLY_BITS + 1 bits so |out| ≤ |q| · 2^23
    q_1perf = shift_round(q_erf + q_one, r)
    s_l = -GELU_A * s_e * s_e * 2**r
    return q * q_1perf, s * s_l / 2.0


def i_exp(q: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """Integer-only ``exp`` (I-BERT Alg. 2) of a non-positive real input ``scale · q``.

    ``x = −z·ln2 + p`` with integer ``z`` and ``p ∈ (−ln2, 0]``; ``exp(p)`` is the second-order
    polynomial and ``exp(x) = exp(p) · 2^−z`` a rounding right shift. Inputs below −30·ln2 are
    clamped there (their exp, < 1e-9, is far below one output step). Relative accuracy ≈ 3.1e-3
    (the polynomial's) plus ~3.4e-4·(1 + z) from the constants; output codes are < 2^23.

    Example:
        >>> out, s = i_exp(torch.tensor([-200, -50, -10, 0]), 0.01)
        >>> [round(v, 4) for v in (out.double() * s).tolist()]
        [0.135, 0.6049, 0.907, 1.0004]
    """
    q = as_int64(q, "q")
    s = _scale(scale)
    if bool((q > 0).any()):
        raise DataError("i_exp takes non-positive inputs; subtract the row maximum first")
    k = _refine(s, LN2 * _FINE)  # so that ln2 is ≥ 2^10 steps
    s_f = s / 2**k
    q_ln2 = round(LN2 / s_f)
    u = torch.clamp(q << k, min=-30 * q_ln2)
    z = (-u) // q_ln2
    p = u + z * q_ln2  # in (−q_ln2, 0]
    q_b = round(EXP_B / s_f)
    q_c = round(EXP_C / (EXP_A * s_f * s_f))
    if max(abs(q_c), (q_ln2 + abs(q_b)) ** 2) >= 2**61:
        raise ConfigError(
            f"i_exp: an input step of {s:.3g} is too fine for int64 arithmetic (the polynomial "
            "needs steps of about 1.4e-9 or coarser); quantize the input with a coarser scale"
        )
    poly = (p + q_b) ** 2 + q_c  # exp(p) at scale EXP_A · s_f²
    r = _cut(q_b * q_b + q_c)
    # poly < 2^62, so a shift past 62 leaves less than half a step: those codes are exactly 0.
    shift = z + r
    out = shift_round(poly, shift.clamp(max=62))
    return torch.where(shift > 62, torch.zeros_like(out), out), EXP_A * s_f * s_f * 2**r


def i_softmax(
    q: torch.Tensor, scale: float | torch.Tensor, dim: int = -1, out_bits: int = 8
) -> tuple[torch.Tensor, float]:
    """Integer-only softmax along ``dim`` (I-BERT Alg. 3).

    Subtracts the row maximum, takes :func:`i_exp`, and divides by the integer row sum with
    round-half-up: ``out = round(e · 2^out_bits / Σe)``, clamped to the unsigned range
    ``[0, 2^out_bits − 1]`` (so the output scale is exactly ``2^−out_bits``).

    Accuracy (tested): ``|2^−B · out − softmax(x)| ≤ 2^−B + 8e-3 · softmax(x) + 1e-6``.

    Example:
        >>> out, s = i_softmax(torch.tensor([[0, 10, 20, 40]], dtype=torch.int8), 0.05)
        >>> out.tolist(), s
        ([[20, 33, 55, 148]], 0.00390625)
    """
    q = as_int64(q, "q")
    if not 1 <= int(out_bits) <= 30:
        raise ConfigError(f"out_bits must be between 1 and 30, got {out_bits}")
    e, _ = i_exp(q - q.amax(dim=dim, keepdim=True), scale)
    total = e.sum(dim=dim, keepdim=True).clamp(min=1)
    out = ((e << (out_bits + 1)) + total) // (2 * total)
    return out.clamp(max=2**out_bits - 1), 2.0**-out_bits


def i_layernorm(
    q: torch.Tensor,
    scale: float | torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    frac_bits: int = 12,
    weight_bits: int = 12,
) -> tuple[torch.Tensor, float]:
    """Integer-only LayerNorm over the last dimension (I-BERT Alg. 4), with optional affine.

    With ``n`` the row length: ``y = n·q − Σq`` centres exactly; each row is shifted so that
    ``n · y²`` fits 2^60 (plus ``eps`` folded into the same integer units); the standard deviation
    is :func:`isqrt` of ``Σy² + eps'``; and the normalised value is ``round(y · M / sd)`` with the
    constant ``M = round(√n · 2^frac_bits)``, at scale ``2^−frac_bits``. ``weight`` is quantized
    symmetrically to ``weight_bits`` (scale ``s_g = max|γ| / (2^(weight_bits−1) − 1)``) and
    ``bias`` to the product scale, so the output is ``norm · q_γ + q_β`` at scale
    ``2^−frac_bits · s_g``. With the defaults the output fits int32 when
    ``√n + max|β| / max|γ| < 255``.

    Accuracy (tested): ``|out_real − LayerNorm(x)| ≤ s_g/2 · (|norm| + 1) + max|γ| · 2^−frac_bits
    + 1e-6`` (``s_g = 0`` and ``max|γ| = 1`` without affine).

    Example:
        >>> out, s = i_layernorm(torch.tensor([[1, 2, 3, 4]], dtype=torch.int8), 0.5)
        >>> [round(v, 4) for v in (out.double() * s).tolist()[0]]
        [-1.3416, -0.4473, 0.4473, 1.3416]
    """
    q = as_int64(q, "q")
    s = _scale(scale)
    if q.dim() == 0 or q.shape[-1] == 0:
        raise DataError(
            "i_layernorm normalises the last dimension; pass a tensor of shape (..., n)"
        )
    if not (0 <= int(frac_bits) <= 24 and 2 <= int(weight_bits) <= 16):
        raise ConfigError("frac_bits must be in [0, 24] and weight_bits in [2, 16]")
    if eps < 0:
        raise ConfigError(f"eps must be ≥ 0, got {eps}")
    n = q.shape[-1]
    y = q * n - q.sum(dim=-1, keepdim=True)  # n · (q − mean), exact
    # Per-row shift t (left if ≥ 0): |y << t| < 2^target so that Σ y² ≤ n · 2^(2 target) ≤ 2^60.
    target = (60 - n.bit_length()) // 2
    t = target - bit_length(y.abs().amax(dim=-1, keepdim=True))
    # eps in units of y²: Σy² = n³ · var(q), and var + eps becomes Σy² + n³ eps / s². Held as
    # e_m · 2^e_e (e_m < 2^20); t is capped so that the shifted eps stays ≤ 2^60.
    eps_units = eps * n**3 / (s * s)
    if eps_units > 0:
        mant, e_e = math.frexp(eps_units)
        e_m, e_e = round(mant * 2**20), e_e - 20
        t = torch.clamp(t, max=(40 - e_e) // 2)
        e_shift = 2 * t + e_e
        e_row = torch.where(
            e_shift >= 0,
            e_m << e_shift.clamp(0, 40),
            e_m >> (-e_shift).clamp(0, 62),
        )
    else:
        e_row = torch.zeros_like(t)
    y = torch.where(t >= 0, y << t.clamp(min=0), y >> (-t).clamp(0, 63))
    sd = isqrt((y * y).sum(dim=-1, keepdim=True) + e_row).clamp(min=1)
    m = round(math.sqrt(n) * 2**frac_bits)
    norm = ((y * m << 1) + sd) // (sd << 1)  # round half up
    out_scale = 2.0**-frac_bits
    if weight is None and bias is None:
        return norm, out_scale
    gamma = torch.ones(n, dtype=torch.float64) if weight is None else weight.detach().double()
    beta = torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().double()
    if gamma.shape != (n,) or beta.shape != (n,):
        raise DataError(
            f"LayerNorm weight and bias must have shape ({n},), like the last dimension"
        )
    gmax = float(gamma.abs().max())
    s_g = gmax / (2 ** (weight_bits - 1) - 1) if gmax > 0 else 1.0
    q_gamma = torch.round(gamma / s_g).to(torch.int64).to(q.device)
    q_beta = torch.round(beta / (s_g * out_scale)).to(torch.int64).to(q.device)
    return norm * q_gamma + q_beta, out_scale * s_g
