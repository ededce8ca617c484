"""The estimators (Lanczos top eigenvalues, Hutchinson and Hutch++ traces, SLQ density) against the
dense Hessian of tiny networks (≤ 300 parameters), through the Hessian operator.

Tolerances: top-3 eigenvalues 1e-4 relative; per-layer traces 3% with 2,000 products (Hutch++),
and plain Hutchinson within 4 of its own standard errors; SLQ weights sum to 1 and its first two
moments within 2%.
"""

from __future__ import annotations

import math

import pytest
import torch

from squeezer.errors import ConfigError
from squeezer.estimators import Density, MatrixOperator, hutchinson, slq, smooth_density, top_eigen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_top3_eigenvalues_match_eigvalsh(cases, kind):
    _, _, H, op = cases[kind]
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    eig = top_eigen(op, 3, rtol=1e-8, max_iter=op.dim, eigenvectors=True)
    assert eig.converged
    assert torch.allclose(torch.tensor(eig.values, dtype=torch.float64), exact, rtol=1e-4, atol=0)
    # Unit eigenvectors with small residuals.
    V = eig.vectors
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-8)
    for j, lam in enumerate(eig.values):
        assert (H @ V[:, j] - lam * V[:, j]).norm() <= 1e-3 * abs(lam)
    assert eig.iterations < op.dim  # Lanczos stopped on its tolerance, not by exhausting the space


def test_default_tolerance_is_met_and_magnitude_order():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1, 1, 60, dtype=torch.float64)
    lam[0], lam[-1] = -5.0, 3.0
    op = MatrixOperator(Q @ torch.diag(lam) @ Q.T)
    la = top_eigen(op, 2)
    assert la.converged and abs(la.values[0] - 3.0) <= 1e-3 * 3.0
    lm = top_eigen(op, 1, which="LM")
    assert abs(lm.values[0] + 5.0) <= 1e-3 * 5.0
    short = top_eigen(op, 2, max_iter=3, rtol=1e-12)
    assert not short.converged and short.iterations == 3
    with pytest.raises(ConfigError):
        top_eigen(op, 0)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_layer_traces_hutchpp_2000_products_within_3_percent(cases, kind):
    _, _, H, op = cases[kind]
    t = hutchinson(op, max_probes=2000 - 2 * 20, method="hutch++", sketch=20, probe_batch=49)
    assert t.hvps == 2000
    for fqn, sl in op.layout.block_slices().items():
        exact = float(H[sl, sl].trace())
        assert abs(t.block_trace[fqn] - exact) <= 0.03 * abs(exact), fqn
        assert abs(t.block_trace[fqn] - exact) <= 5 * t.block_stderr[fqn] + 1e-12, fqn
    assert abs(t.trace - float(H.trace())) <= 0.03 * abs(float(H.trace()))


def _hutchinson_std(H: torch.Tensor, sl: slice) -> float:
    """Exact std of one Rademacher sample z_lᵀ(Hz)_l: Var = Σ_{i∈l, j≠i} H_ij² (1 + [j∈l])."""
    rows = H[sl].clone()
    rows[:, sl] -= torch.diag(torch.diag(H[sl, sl]))
    inside = torch.ones_like(rows)
    inside[:, sl] = 2.0
    return float(((rows**2) * inside).sum().sqrt())


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_layer_traces_hutchinson_unbiased_with_honest_stderr(cases, kind):
    _, _, H, op = cases[kind]
    t = hutchinson(op, max_probes=2000, probe_batch=50)
    assert t.probes == 2000 and t.method == "hutchinson"
    blocks = op.layout.block_slices()
    for fqn, sl in blocks.items():
        exact = float(H[sl, sl].trace())
        assert abs(t.block_trace[fqn] - exact) <= 4 * t.block_stderr[fqn], fqn
        predicted = _hutchinson_std(H, sl) / math.sqrt(2000)
        assert 0.8 < t.block_stderr[fqn] / predicted < 1.2, fqn
    whole = slice(0, op.dim)
    assert abs(t.trace - float(H.trace())) <= 4 * t.stderr
    assert 0.8 < t.stderr / (_hutchinson_std(H, whole) / math.sqrt(2000)) < 1.2


def test_hutchpp_is_exact_for_low_rank_and_stops_on_target():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 4, generator=g, dtype=torch.float64)
    op = MatrixOperator(A @ A.T)  # rank 4 < sketch
    blocks = {"a": slice(0, 20), "b": slice(20, 50)}
    t = hutchinson(op, blocks=blocks, method="hutch++", sketch=6, max_probes=5)
    H = A @ A.T
    assert abs(t.trace - float(H.trace())) < 1e-9 and t.stderr < 1e-9
    assert abs(t.block_trace["a"] - float(H[:20, :20].trace())) < 1e-9

    # Stop rule: a diagonal-dominant matrix reaches 5% quickly; the estimate honours the target.
    op2 = MatrixOperator(torch.diag(torch.linspace(1, 2, 50, dtype=torch.float64)) + 0.02 * H)
    t2 = hutchinson(op2, max_probes=500, rel_stderr=0.05, min_probes=10)
    assert 10 <= t2.probes < 500 and t2.stderr <= 0.05 * abs(t2.trace)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_slq_weights_and_first_two_moments(cases, kind):
    _, _, H, op = cases[kind]
    ev = torch.linalg.eigvalsh(H)
    d = slq(op, probes=60, steps=12, deflate=30, probe_batch=20)
    assert abs(sum(d.weights) - 1.0) < 1e-10 and min(d.weights) >= 0
    assert abs(d.moment(1) - float(ev.mean())) <= 0.02 * abs(float(ev.mean()))
    assert abs(d.moment(2) - float((ev**2).mean())) <= 0.02 * float((ev**2).mean())
    # The nodes lie inside the spectrum (Ritz values interlace).
    assert min(d.nodes) >= float(ev[0]) - 1e-9 and max(d.nodes) <= float(ev[-1]) + 1e-9


def test_slq_exact_when_lanczos_spans_the_space():
    lam = torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64)
    d = slq(MatrixOperator(torch.diag(lam)), probes=3, steps=10)
    assert sorted({round(x, 8) for x in d.nodes}) == lam.tolist()
    # Rademacher probes weigh every coordinate of a diagonal matrix equally: weights exactly 1/4.
    assert abs(d.moment(1) - float(lam.mean())) < 1e-12
    assert abs(d.moment(2) - float((lam**2).mean())) < 1e-12


def test_smooth_density_integrates_to_one():
    d = smooth_density(Density(nodes=(0.0, 1.0, 5.0), weights=(0.2, 0.3, 0.5)), num=2000)
    dx = d.grid[1] - d.grid[0]
    assert abs(sum(d.values) * dx - 1.0) < 1e-3
    assert d.sigma == pytest.approx(0.05)


