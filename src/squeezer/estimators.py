"""Matrix-free estimators of a symmetric operator's top eigenpairs, trace and spectral density.

They see the operator only through products ``H v`` (a :class:`LinearOperator`) and know nothing of
models: Lanczos with full reorthogonalisation for the top eigenvalues (:func:`top_eigen`),
Hutchinson's estimator and Hutch++ for the trace and the traces of diagonal blocks
(:func:`hutchinson`), and stochastic Lanczos quadrature for the eigenvalue density (:func:`slq`,
:func:`smooth_density`), all drawing seeded Rademacher probes; :mod:`squeezer.spectrum` applies them
to a network's Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from . import distributed
from .errors import ConfigError


class LinearOperator(Protocol):
    """A symmetric operator on flat float64 vectors: what the estimators below need.

    ``matmat`` (several products at once) is optional; :func:`apply` falls back to ``matvec``.
    """

    dim: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class MatrixOperator:
    """A dense symmetric matrix as a :class:`LinearOperator` (for tests and small problems).

    Example:
        >>> MatrixOperator(torch.eye(3)).matvec(torch.ones(3, dtype=torch.float64))
        tensor([1., 1., 1.], dtype=torch.float64)
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix.to(torch.float64)
        self.dim = int(matrix.shape[0])
        self.hvp_count = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.hvp_count += V.shape[1]
        return self.matrix @ V


def apply(op: LinearOperator, V: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``op`` applied to every column of ``V`` (``dim × b``), ``chunk`` columns per call.

    Operators with ``matmat`` take a chunk at once; others are applied column by column.

    Example:
        >>> apply(MatrixOperator(2 * torch.eye(2)), torch.eye(2, dtype=torch.float64))
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    matmat = getattr(op, "matmat", None)
    if matmat is not None:
        step = V.shape[1] if chunk is None else max(1, chunk)
        return torch.cat([matmat(V[:, i : i + step]) for i in range(0, V.shape[1], step)], 1)
    return torch.stack([op.matvec(V[:, j].contiguous()) for j in range(V.shape[1])], 1)


def _device(op: LinearOperator) -> torch.device:
    return getattr(op, "device", torch.device("cpu"))


def rademacher(
    dim: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A float64 vector of independent ±1 entries drawn from ``generator`` (on CPU, then moved).

    Example:
        >>> rademacher(4, torch.Generator().manual_seed(0)).abs().sum().item()
        4.0
    """
    bits = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (bits.to(torch.float64) * 2 - 1).to(device)


# --------------------------------------------------------------------------------------- Lanczos
def _lanczos(
    op: LinearOperator,
    starts: torch.Tensor,
    steps: int,
    stop: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Lanczos tridiagonalisation with full reorthogonalisation, for the columns of ``starts``.

    The ``b`` columns of ``starts`` (``dim × b``) run in lockstep, so each step is one call of
    :func:`apply`. Returns, per column, ``(alpha, beta, V)``: the diagonal, the off-diagonal
    (``beta[j]`` couples step ``j`` to ``j+1``; the last entry is the residual norm, 0 when the
    Krylov space became invariant) and the orthonormal basis ``V`` (rows). Stops after ``steps``
    products, on invariance, or (one column only) when ``stop(alpha, beta)`` is true. Full
    reorthogonalisation (twice is enough) keeps Ritz values free of the spurious copies plain
    Lanczos produces in floating point.
    """
    n, b = starts.shape
    steps = min(steps, n)
    V = torch.empty(b, steps + 1, n, dtype=torch.float64, device=starts.device)
    V[:, 0] = (starts / starts.norm(dim=0)).T
    alpha = torch.zeros(b, steps, dtype=torch.float64)
    beta = torch.zeros(b, steps, dtype=torch.float64)
    length = [steps] * b
    scale = torch.zeros(b, dtype=torch.float64)
    live = list(range(b))
    for j in range(steps):
        Vl = V if len(live) == b else V[live]  # a copy only once some column has stopped
        W = apply(op, Vl[:, j].T.contiguous()).T  # (a, n)
        a = (W * Vl[:, j]).sum(1)
        W = W - a[:, None] * Vl[:, j]
        if j > 0:
            W = W - beta[live, j - 1].to(W.device)[:, None] * Vl[:, j - 1]
        basis = Vl[:, : j + 1]  # (a, j+1, n)
        for _ in range(2):
            W = W - torch.einsum("akn,ak->an", basis, torch.einsum("akn,an->ak", basis, W))
        norms = W.norm(dim=1)
        alpha[live, j] = a.cpu()
        beta[live, j] = norms.cpu()
        scale[live] = torch.maximum(scale[live], torch.maximum(a.abs().cpu(), norms.cpu()))
        still = []
        for r, col in enumerate(live):
            if float(norms[r]) <= 1e-10 * max(float(scale[col]), 1e-300):
                beta[col, j] = 0.0  # invariant subspace: the Ritz values are exact
                length[col] = j + 1
            else:
                V[col, j + 1] = W[r] / norms[r]
                still.append(col)
        live = still
        if stop is not None and live and b == 1:
            if distributed.broadcast_flag(stop(alpha[0, : j + 1], beta[0, : j + 1])):
                length[0] = j + 1
                break
        if not live:
            break
    return [(alpha[i, : length[i]], beta[i, : length[i]], V[i, : length[i]]) for i in range(b)]


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    m = len(alpha)
    return torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)


@dataclass(frozen=True)
class Eigen:
    """Result of :func:`top_eigen`.

    Attributes:
        values: the ``k`` eigenvalues, largest first.
        vectors: ``(dim, k)`` unit eigenvectors (Ritz vectors) if asked for, else ``None``.
        errors: a posteriori error estimates of ``values`` (Ritz residual bounds).
        iterations: Hessian-vector products used.
        converged: every value met ``max(atol, rtol·|value|)``.
    """

    values: tuple[float, ...]
    vectors: torch.Tensor | None
    errors: tuple[float, ...]
    iterations: int
    converged: bool


def _ritz(
    alpha: torch.Tensor, beta: torch.Tensor, k: int, which: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` Ritz values, their error estimates, the chosen indices and the eigenvectors of T."""
    theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta))
    key = theta.abs() if which == "LM" else theta
    idx = torch.argsort(key, descending=True)[:k]
    resid = beta[-1].abs() * S[-1, idx].abs()
    # A Ritz value's error is at most its residual, and at most residual²/gap (Kahan-Parlett-Jiang)
    # where the gap to the rest of the spectrum is estimated from the other Ritz values.
    err = resid.clone()
    if len(theta) > 1:
        for i, t in enumerate(idx.tolist()):
            others = torch.cat([theta[:t], theta[t + 1 :]])
            gap = float((others - theta[t]).abs().min())
            if gap > 0:
                err[i] = min(float(resid[i]), float(resid[i]) ** 2 / gap)
    return theta[idx], err, idx, S


def top_eigen(
    op: LinearOperator,
    k: int = 3,
    *,
    rtol: float = 1e-3,
    atol: float = 0.0,
    max_iter: int = 100,
    which: str = "LA",
    eigenvectors: bool = False,
    generator: torch.Generator | None = None,
) -> Eigen:
    """The ``k`` largest eigenvalues of ``op`` by Lanczos with full reorthogonalisation.

    Stops when every one of the top ``k`` Ritz values has an error estimate below
    ``max(atol, rtol·|value|)`` and has moved by less than that since the previous step, or after
    ``max_iter`` products (then ``converged`` is false), or when the Krylov space is invariant
    (then the values are exact).

    Args:
        op: the Hessian (a :class:`~squeezer.hvp.HessianOperator`) or any :class:`LinearOperator`.
        k: how many eigenvalues.
        rtol: relative tolerance on each eigenvalue.
        atol: absolute tolerance on each eigenvalue.
        max_iter: the most Hessian-vector products to spend.
        which: ``"LA"`` largest algebraic (default) or ``"LM"`` largest magnitude.
        eigenvectors: also return the unit eigenvectors (``dim × k``, float64).
        generator: draws the start vector; default ``torch.Generator().manual_seed(0)``.

    Example:
        >>> eig = top_eigen(MatrixOperator(torch.diag(torch.arange(10.0))), k=2)
        >>> [round(v, 6) for v in eig.values], eig.converged
        ([9.0, 8.0], True)
    """
    if k < 1 or k > op.dim:
        raise ConfigError(
            f"k={k} eigenvalues asked of a {op.dim}-dimensional Hessian; use 1..{op.dim}"
        )
    if which not in ("LA", "LM"):
        raise ConfigError(f"which={which!r} is not supported; use 'LA' or 'LM'")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    start = rademacher(op.dim, generator, _device(op))
    previous: list[torch.Tensor] = []

    def stop(alpha: torch.Tensor, beta: torch.Tensor) -> bool:
        if len(alpha) < k:
            return False
        values, err, _, _ = _ritz(alpha, beta, k, which)
        bound = torch.clamp(rtol * values.abs(), min=atol)
        moved = (values - previous[0]).abs() if previous else torch.full_like(values, math.inf)
        previous[:] = [values]
        return bool(((err <= bound) & (moved <= bound)).all())

    [(alpha, beta, V)] = _lanczos(op, start[:, None], max(max_iter, k), stop)
    values, err, idx, S = _ritz(alpha, beta, k, which)
    bound = torch.clamp(rtol * values.abs(), min=atol)
    exhausted = float(beta[-1]) == 0.0
    converged = exhausted or bool((err <= bound).all())
    vectors = V.T @ S[:, idx] if eigenvectors else None
    return Eigen(
        values=tuple(float(x) for x in values),
        vectors=vectors,
        errors=tuple(0.0 if exhausted else float(e) for e in err),
        iterations=len(alpha),
        converged=converged,
    )


# ------------------------------------------------------------------------------------- Traces
@dataclass(frozen=True)
class Trace:
    """Result of :func:`hutchinson`.

    Attributes:
        trace: estimate of Tr(H).
        stderr: its standard error (over probes; Hutch++'s exact low-rank part adds none).
        block_trace: ``{FQN: estimate of Tr(H_ll)}`` for every layer block, from the same probes.
        block_stderr: their standard errors.
        probes: random probes used.
        hvps: Hessian-vector products used (``probes`` plus ``2·sketch`` for Hutch++).
        method: ``"hutchinson"`` or ``"hutch++"``.
    """

    trace: float
    stderr: float
    block_trace: dict[str, float]
    block_stderr: dict[str, float]
    probes: int
    hvps: int
    method: str


def _stderr(samples: torch.Tensor) -> float:
    n = samples.shape[0]
    return float(samples.std(dim=0, unbiased=True) / math.sqrt(n)) if n > 1 else math.inf


def hutchinson(
    op: LinearOperator,
    *,
    blocks: Mapping[str, slice] | None = None,
    max_probes: int = 200,
    min_probes: int = 10,
    rel_stderr: float | None = None,
    method: str = "hutchinson",
    sketch: int = 10,
    probe_batch: int = 1,
    generator: torch.Generator | None = None,
) -> Trace:
    """Tr(H) and every block's trace by Hutchinson's estimator, all from the same probes.

    For a Rademacher probe ``z``, ``zᵀHz`` is an unbiased estimate of Tr(H) and, for a block ``l``
    of coordinates, ``z_lᵀ(Hz)_l`` is one of Tr(H_ll): per-layer traces cost no extra products.
    With ``method="hutch++"`` a sketch ``Q`` of ``sketch`` directions is taken first (``2·sketch``
    products); the traces of ``QᵀHQ`` (total and per block) are exact and the probes, projected
    off ``Q``, only estimate the remainder, which has less variance when a few eigenvalues
    dominate.

    Args:
        op: the Hessian operator.
        blocks: ``{name: slice}`` of the flat vector; default ``op.layout.block_slices()``.
        max_probes: most probes (Hessian-vector products) after the sketch.
        min_probes: fewest probes before the stopping rule may stop (at least 2).
        rel_stderr: stop once ``stderr ≤ rel_stderr·|trace|``; ``None`` uses ``max_probes``.
        method: ``"hutchinson"`` or ``"hutch++"``.
        sketch: Hutch++'s sketch size.
        probe_batch: probes per call of the operator (see ``HessianOperator.matmat``); the
            probes drawn are the same for any value, the stopping rule is checked per batch.
        generator: draws the probes; default ``torch.Generator().manual_seed(0)``.

    Example:
        >>> t = hutchinson(MatrixOperator(torch.diag(torch.arange(4.0))), blocks={"a": slice(0, 2)})
        >>> t.trace, t.block_trace["a"]
        (6.0, 1.0)
    """
    if method not in ("hutchinson", "hutch++"):
        raise ConfigError(f"unknown trace method {method!r}; use 'hutchinson' or 'hutch++'")
    if max_probes < 2:
        raise ConfigError(f"max_probes={max_probes} is too few for a standard error; use >= 2")
    if blocks is None:
        layout = getattr(op, "layout", None)
        blocks = layout.block_slices() if layout is not None else {}
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = _device(op)
    min_probes = max(2, min(min_probes, max_probes))
    probe_batch = max(1, probe_batch)

    def draw(count: int) -> torch.Tensor:
        return torch.stack([rademacher(op.dim, generator, device) for _ in range(count)], 1)

    base_total, base_block = 0.0, dict.fromkeys(blocks, 0.0)
    Q: torch.Tensor | None = None
    hvps = 0
    if method == "hutch++":
        s = max(1, min(sketch, op.dim))
        Q, _ = torch.linalg.qr(apply(op, draw(s), probe_batch))
        HQ = apply(op, Q, probe_batch)
        hvps += 2 * s
        # Tr(P_l H Q Qᵀ) = Σ_j (q_j)_l · (H q_j)_l, exactly.
        base_total = float((Q * HQ).sum())
        base_block = {name: float((Q[sl] * HQ[sl]).sum()) for name, sl in blocks.items()}

    totals: list[torch.Tensor] = []
    per_block: list[torch.Tensor] = []
    count = 0
    while count < max_probes:
        Z = draw(min(probe_batch, max_probes - count))
        if Q is not None:
            # Tr(P_l H (I-QQᵀ)) = E[w_lᵀ (Hw)_l] with w = (I-QQᵀ)z, since (I-QQᵀ) is a projector.
            Z = Z - Q @ (Q.T @ Z)
        HZ = apply(op, Z)
        hvps += Z.shape[1]
        count += Z.shape[1]
        totals.append((Z * HZ).sum(0).cpu())
        per_block.append(
            torch.stack([(Z[sl] * HZ[sl]).sum(0).cpu() for sl in blocks.values()], 1)
            if blocks
            else torch.zeros(Z.shape[1], 0, dtype=torch.float64)
        )
        if rel_stderr is not None and count >= min_probes:
            t = torch.cat(totals)
            done = _stderr(t) <= rel_stderr * abs(base_total + float(t.mean()))
            if distributed.broadcast_flag(done):
                break

    t = torch.cat(totals)
    b = torch.cat(per_block)
    names = list(blocks)
    return Trace(
        trace=base_total + float(t.mean()),
        stderr=_stderr(t),
        block_trace={k: base_block[k] + float(b[:, i].mean()) for i, k in enumerate(names)},
        block_stderr={k: _stderr(b[:, i]) for i, k in enumerate(names)},
        probes=count,
        hvps=hvps,
        method=method,
    )


# ------------------------------------------------------------------------------------ Density
@dataclass(frozen=True)
class Density:
    """An eigenvalue density: SLQ quadrature nodes and weights, and a Gaussian-smoothed curve.

    The weights sum to 1 (each probe's quadrature weights sum to 1 and probes are averaged), so
    ``Σ w·λ`` estimates Tr(H)/dim and ``Σ w·λ²`` estimates Tr(H²)/dim.
    """

    nodes: tuple[float, ...]
    weights: tuple[float, ...]
    grid: tuple[float, ...] = ()
    values: tuple[float, ...] = ()
    sigma: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Density:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def moment(self, p: int) -> float:
        """``Σ w·λ^p``, the p-th moment of the density (estimates Tr(H^p)/dim)."""
        return float(sum(w * x**p for x, w in zip(self.nodes, self.weights, strict=True)))


class _Deflated:
    """``P H P`` with ``P = I - QQᵀ``: the Hessian with the directions ``Q`` projected out."""

    def __init__(self, op: LinearOperator, Q: torch.Tensor) -> None:
        self.op, self.Q, self.dim = op, Q, op.dim
        self.device = _device(op)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return v - self.Q @ (self.Q.T @ v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.project(apply(self.op, self.project(V)))


def slq(
    op: LinearOperator,
    *,
    probes: int = 8,
    steps: int = 64,
    deflate: int | Eigen = 0,
    probe_batch: int = 1,
    generator: torch.Generator | None = None,
) -> Density:
    """Eigenvalue density by stochastic Lanczos quadrature, with full reorthogonalisation.

    For each normalised Rademacher probe, ``steps`` Lanczos steps give a tridiagonal ``T``; its
    eigenvalues (``eigh``) are Gauss quadrature nodes and the squared first components of its
    eigenvectors the weights. Averaging over probes estimates the density of eigenvalues.

    With ``deflate``, the top eigenpairs ``(θ_i, q_i)`` become point masses of weight ``1/dim``
    each and SLQ runs on the rest, ``(I-QQᵀ)H(I-QQᵀ)`` with probes projected off ``Q``. A network
    Hessian's few outlying eigenvalues dominate the probe-to-probe variance of plain SLQ (its
    first moment is Hutchinson's trace estimate), so deflation makes the moments far more
    accurate for the same products, in the spirit of Hutch++. Because Ritz vectors satisfy
    ``QᵀHQ = diag(θ)``, the first moment stays unbiased even if they have not converged.

    Args:
        op: the Hessian operator.
        probes: number of random probes (each costs ``steps`` products).
        steps: Lanczos steps per probe (capped at ``op.dim``).
        deflate: how many top eigenpairs to deflate (computed here), or an :class:`Eigen` with
            ``vectors`` from :func:`top_eigen`.
        probe_batch: probes whose Lanczos runs share each call of the operator (lockstep).
        generator: draws the probes; default ``torch.Generator().manual_seed(0)``.

    Example:
        >>> d = slq(MatrixOperator(torch.diag(torch.tensor([1.0, 2.0]))), probes=2)
        >>> round(sum(d.weights), 6), round(d.moment(1), 6)
        (1.0, 1.5)
    """
    probe_batch = max(1, probe_batch)
    if probes < 1 or steps < 1:
        raise ConfigError(f"slq needs probes >= 1 and steps >= 1, got {probes} and {steps}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    n = op.dim
    nodes: list[float] = []
    weights: list[float] = []
    target: LinearOperator = op
    if isinstance(deflate, int) and deflate > 0:
        deflate = top_eigen(
            op,
            min(deflate, n),
            rtol=1e-8,
            max_iter=max(100, 3 * deflate),
            eigenvectors=True,
            generator=generator,
        )
    if isinstance(deflate, Eigen):
        if deflate.vectors is None:
            raise ConfigError(
                "slq(deflate=...) needs eigenvectors; call top_eigen(..., eigenvectors=True)"
            )
        Q = deflate.vectors.to(_device(op))
        nodes += list(deflate.values)
        weights += [1.0 / n] * Q.shape[1]
        target = _Deflated(op, Q)
    rest = (n - len(nodes)) / n
    if rest > 0:
        for first in range(0, probes, probe_batch):
            count = min(probe_batch, probes - first)
            starts = torch.stack([rademacher(n, generator, _device(op)) for _ in range(count)], 1)
            if isinstance(target, _Deflated):
                starts = target.project(starts)
            for alpha, beta, _ in _lanczos(target, starts, steps):
                theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta))
                nodes += theta.tolist()
                weights += (S[0] ** 2 * (rest / probes)).tolist()
    return Density(nodes=tuple(nodes), weights=tuple(weights))


def smooth_density(density: Density, *, sigma: float | None = None, num: int = 400) -> Density:
    """``density`` with a Gaussian-smoothed curve ``Σ w·N(x; λ, σ²)`` on an even grid, for plots.

    Args:
        density: SLQ nodes and weights (from :func:`slq`).
        sigma: kernel width; default 1% of the spread of the nodes.
        num: grid points, spanning the nodes ± 3σ.

    Example:
        >>> d = smooth_density(Density(nodes=(0.0,), weights=(1.0,)), sigma=1.0, num=201)
        >>> round(sum(d.values) * (d.grid[1] - d.grid[0]), 2)
        1.0
    """
    x = torch.tensor(density.nodes, dtype=torch.float64)
    w = torch.tensor(density.weights, dtype=torch.float64)
    spread = float(x.max() - x.min()) if len(x) else 0.0
    if sigma is None:
        sigma = 0.01 * spread if spread > 0 else max(1e-3 * float(x.abs().max()), 1e-6)
    grid = torch.linspace(
        float(x.min()) - 3 * sigma, float(x.max()) + 3 * sigma, num, dtype=torch.float64
    )
    kernel = torch.exp(-0.5 * ((grid[:, None] - x[None, :]) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    values = kernel @ w
    return Density(
        nodes=density.nodes,
        weights=density.weights,
        grid=tuple(grid.tolist()),
        values=tuple(values.tolist()),
        sigma=float(sigma),
    )
