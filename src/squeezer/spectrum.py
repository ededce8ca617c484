"""Hessian spectrum of a trained model: top eigenvalues, per-layer traces, spectral density.

It needs only Hessian-vector products (:mod:`squeezer.hvp`), fed to the model-agnostic
estimators of :mod:`squeezer.estimators`:

- top eigenvalues by Lanczos with full reorthogonalisation (Lanczos 1950; Parlett, "The Symmetric
  Eigenvalue Problem"), which needs fewer products than PyHessian's power iteration with deflation
  (Yao et al., arXiv:1912.07145) for the same accuracy;
- traces by Hutchinson's estimator with seeded Rademacher probes (Hutchinson 1989), and every
  layer's trace from the *same* probes, since ``E[v_lᵀ (Hv)_l] = Tr(H_ll)``; optionally Hutch++
  (Meyer et al., arXiv:2010.09649), which computes the trace of a low-rank sketch exactly and
  estimates only the remainder; the per-layer trace, divided by the layer's size, is HAWQ-V2's
  sensitivity (arXiv:1911.03852);
- each layer's top eigenvalue, HAWQ's sensitivity (arXiv:1905.03696);
- the eigenvalue density by stochastic Lanczos quadrature (Lin, Saad and Yang, "Approximating
  spectral densities of large matrices", SIAM Review 2016; Ghorbani et al., arXiv:1901.10159),
  as used in "Hessian-based analysis of large batch training" (arXiv:1802.08241).

:func:`analyze` runs them all and returns a :class:`Spectrum`, plain data keyed by layer FQN that
round-trips through JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import ConfigError
from .estimators import Density, Eigen, hutchinson, slq, smooth_density, top_eigen
from .hvp import HessianOperator, LossFn

SPECTRUM_VERSION = 1


# ----------------------------------------------------------------------------------- Spectrum
@dataclass(frozen=True)
class Spectrum:
    """The Hessian analysis of one model on one data set: plain data keyed by layer FQN.

    Attributes:
        top_eigenvalues: the top-k eigenvalues of the full Hessian, largest first.
        eig_converged: whether Lanczos met its tolerance.
        trace: Hutchinson estimate of Tr(H) over every analysed parameter.
        trace_stderr: its standard error.
        probes: trace probes used.
        trace_method: ``"hutchinson"`` or ``"hutch++"``.
        layer_trace: ``{FQN: Tr(H_ll)}`` of each quantizable layer's weight block.
        layer_trace_stderr: their standard errors.
        layer_params: ``{FQN: number of weights}``.
        layer_top_eigenvalue: ``{FQN: top eigenvalue of H_ll}`` (empty if not computed).
        params: number of analysed parameters (the side of H; biases etc. included).
        samples: number of data samples the loss averages over.
        density: SLQ density, or ``None``.
        hvp_count: Hessian-vector products used in total (each over all the data).
        seconds: wall time.
        seed: the seed every random draw derived from.
        version: format version of this record.
    """

    top_eigenvalues: tuple[float, ...]
    trace: float
    trace_stderr: float
    layer_trace: dict[str, float]
    layer_trace_stderr: dict[str, float]
    layer_params: dict[str, int]
    layer_top_eigenvalue: dict[str, float] = field(default_factory=dict)
    eig_converged: bool = True
    probes: int = 0
    trace_method: str = "hutchinson"
    params: int = 0
    samples: int = 0
    density: Density | None = None
    hvp_count: int = 0
    seconds: float = 0.0
    seed: int = 0
    version: int = SPECTRUM_VERSION

    @property
    def layer_mean_trace(self) -> dict[str, float]:
        """``{FQN: Tr(H_ll) / n_l}``: HAWQ-V2's average Hessian trace per layer."""
        return {k: v / self.layer_params[k] for k, v in self.layer_trace.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the derived ``layer_mean_trace`` is included for readers).

        Example:
            >>> s = Spectrum((2.0,), 3.0, 0.1, {"fc": 3.0}, {"fc": 0.1}, {"fc": 6})
            >>> Spectrum.from_dict(s.to_dict()) == s
            True
        """
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Density):
                v = v.to_dict()
            elif isinstance(v, dict):
                v = dict(v)
            d[f.name] = v
        d["layer_mean_trace"] = self.layer_mean_trace
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Spectrum:
        """Inverse of :meth:`to_dict`; derived keys are ignored, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known - {"layer_mean_trace"}
        if extra:
            raise ConfigError(
                f"unknown spectrum fields {sorted(extra)}; is the file a spectrum.json?"
            )
        if d.get("version", SPECTRUM_VERSION) > SPECTRUM_VERSION:
            raise ConfigError(
                f"spectrum version {d['version']} is newer than this squeezer "
                f"(reads up to {SPECTRUM_VERSION}); upgrade squeezer"
            )
        kw = {k: v for k, v in d.items() if k in known}
        kw["top_eigenvalues"] = tuple(kw["top_eigenvalues"])
        kw["layer_params"] = {k: int(v) for k, v in kw["layer_params"].items()}
        if kw.get("density") is not None:
            kw["density"] = Density.from_dict(kw["density"])
        return cls(**kw)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (a temporary file renamed over ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1, allow_nan=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Spectrum:
        """Read a spectrum written by :meth:`save`."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"cannot read spectrum {path}: {exc}; run `squeezer analyze` first"
            ) from exc


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent generator per estimator, so switching one off leaves the others' draws alone."""
    return torch.Generator().manual_seed(seed * 16 + stream)


def analyze(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    top_k: int = 3,
    max_probes: int = 200,
    min_probes: int = 10,
    rel_stderr: float | None = 0.05,
    trace_method: str = "hutchinson",
    sketch: int = 10,
    eig_rtol: float = 1e-3,
    eig_max_iter: int = 100,
    per_layer_eig: bool = True,
    density: bool = False,
    density_probes: int = 4,
    density_steps: int = 48,
    params: Sequence[str] | None = None,
    backend: str = "double_backprop",
    cache_samples: int = 4096,
    probe_batch: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Spectrum:
    """Hessian analysis of ``model`` on ``data``: top eigenvalues, per-layer traces, density.

    The Hessian is that of the dataset-mean loss with respect to every trainable parameter (or
    ``params``), with BatchNorm and dropout in eval mode; the caller's model is not modified.
    Under ``torch.distributed`` every rank passes the same ``data`` (or its shard, see
    :class:`~squeezer.hvp.HessianOperator`), and all ranks return the same :class:`Spectrum`.

    Args:
        model: the trained network.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        data: a re-iterable of ``(inputs, targets)`` batches, or one batch.
        top_k: how many top eigenvalues of the full Hessian (0 skips them).
        max_probes: most trace probes.
        min_probes: fewest trace probes before the stopping rule may stop.
        rel_stderr: stop the trace once its relative standard error is below this (None: never).
        trace_method: ``"hutchinson"`` or ``"hutch++"``.
        sketch: Hutch++'s sketch size.
        eig_rtol: relative tolerance of every eigenvalue.
        eig_max_iter: most Lanczos steps per eigenproblem.
        per_layer_eig: also each layer block's top eigenvalue (HAWQ-V1).
        density: also the SLQ spectral density (``density_probes × density_steps`` products),
            with the top-k eigenpairs deflated (see :func:`slq`).
        density_probes: SLQ probes.
        density_steps: Lanczos steps per SLQ probe.
        params: parameter names to analyse; default all trainable ones.
        backend: Hessian-vector product backend, ``"double_backprop"`` or ``"func"``.
        cache_samples: samples whose gradient graphs are kept between products.
        probe_batch: trace and SLQ probes per vmapped backward pass. Default: 8 for models of
            up to 20,000 analysed parameters (where it is several times faster), else 1 (where
            it gains nothing here and multiplies the memory of a backward pass). Results do not
            depend on it, except that the trace's stopping rule is checked once per batch.
        seed: seeds every random draw (non-negative).
        progress: show a progress bar (one tick per Hessian-vector product) on stderr.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> spec = analyze(net, nn.functional.cross_entropy, [(x, y)], per_layer_eig=False)
        >>> sorted(spec.layer_trace)
        ['0', '2']
    """
    if seed < 0:
        raise ConfigError(f"seed={seed} is negative; use a seed >= 0")
    if trace_method not in ("hutchinson", "hutch++"):
        raise ConfigError(f"unknown trace method {trace_method!r}; use 'hutchinson' or 'hutch++'")
    t0 = time.perf_counter()
    if params is None:  # analyse the layers quantize() will see: attention split into Linears
        from .graph import split_attention

        model = split_attention(model)
    op = HessianOperator(
        model, loss_fn, data, params=params, backend=backend, cache_samples=cache_samples
    )
    if probe_batch is None:
        probe_batch = 8 if op.dim <= 20_000 else 1
    bar = _progress_bar(progress)
    ops: list[HessianOperator] = [op]
    op.on_hvp = bar.update
    try:
        values: tuple[float, ...] = ()
        converged = True
        eig: Eigen | None = None
        if top_k > 0:
            eig = top_eigen(
                op,
                min(top_k, op.dim),
                rtol=eig_rtol,
                max_iter=eig_max_iter,
                eigenvectors=density,
                generator=_generator(seed, 0),
            )
            values, converged = eig.values, eig.converged
        tr = hutchinson(
            op,
            max_probes=max_probes,
            min_probes=min_probes,
            rel_stderr=rel_stderr,
            method=trace_method,
            sketch=sketch,
            probe_batch=probe_batch,
            generator=_generator(seed, 1),
        )
        dens = None
        if density:
            # The top eigenpairs are known already: deflating them cuts SLQ's variance for free.
            dens = smooth_density(
                slq(
                    op,
                    probes=density_probes,
                    steps=density_steps,
                    deflate=eig if eig is not None else 0,
                    probe_batch=probe_batch,
                    generator=_generator(seed, 2),
                )
            )
        layer_eig: dict[str, float] = {}
        if per_layer_eig:
            done: dict[str, float] = {}
            for fqn, name in op.layout.blocks.items():
                if name not in done:
                    sub = op.restricted([name])
                    sub.on_hvp = bar.update
                    ops.append(sub)
                    done[name] = top_eigen(
                        sub, 1, rtol=eig_rtol, max_iter=eig_max_iter, generator=_generator(seed, 3)
                    ).values[0]
                    sub.release()
                layer_eig[fqn] = done[name]
    finally:
        bar.close()
        op.release()
    layout = op.layout
    return Spectrum(
        top_eigenvalues=values,
        eig_converged=converged,
        trace=tr.trace,
        trace_stderr=tr.stderr,
        probes=tr.probes,
        trace_method=tr.method,
        layer_trace=tr.block_trace,
        layer_trace_stderr=tr.block_stderr,
        layer_params={
            fqn: layout.slice_of(n).stop - layout.slice_of(n).start
            for fqn, n in layout.blocks.items()
        },
        layer_top_eigenvalue=layer_eig,
        params=op.dim,
        samples=op.samples,
        density=dens,
        hvp_count=sum(o.hvp_count for o in ops),
        seconds=time.perf_counter() - t0,
        seed=seed,
    )


def _progress_bar(enabled: bool) -> Any:
    from tqdm import tqdm

    rank, _ = distributed.world()
    # Shown only on a terminal (as squeezer.progress does), never in logs or CI output.
    quiet = not sys.stderr.isatty() or bool(os.environ.get("SQUEEZER_NO_PROGRESS"))
    return tqdm(
        desc="Hessian-vector products",
        unit="hvp",
        file=sys.stderr,
        disable=not enabled or rank != 0 or quiet,
        leave=False,
    )


# ------------------------------------------------------------------------------ CLI and report
def analyze_dataset(
    model: nn.Module,
    dataset: Any,
    *,
    samples: int = 2048,
    batch_size: int = 256,
    **kwargs: Any,
) -> Spectrum:
    """:func:`analyze` on a seeded subset of a :class:`squeezer.data.Dataset`'s training split.

    What ``squeezer analyze MODEL --data DATA --out DIR`` runs: the loss is the data set's task
    loss, the data ``samples`` training samples drawn with the analysis seed.

    Args:
        model: the trained network.
        dataset: from :func:`squeezer.load_data` (``x_train``, ``y_train``, ``task``).
        samples: training samples the Hessian averages over.
        batch_size: samples per batch (per Hessian-vector product pass).
        **kwargs: passed to :func:`analyze` (``seed``, ``top_k``, ``density``, ...).

    Example:
        >>> spec = analyze_dataset(load_model("zoo:digits_cnn"), load_data("digits"))  # doctest: +SKIP
    """
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples={samples} and batch_size={batch_size} must both be positive")
    seed = int(kwargs.get("seed", 0))
    data = dataset.analysis_batches(samples, batch_size=batch_size, seed=seed)
    return analyze(model, dataset.task.loss, data, **kwargs)


def summary(spec: Spectrum) -> str:
    """A short plain-text table of ``spec`` for the terminal.

    Example:
        >>> spec = Spectrum((2.0,), 3.0, 0.1, {"fc": 3.0}, {"fc": 0.1}, {"fc": 6})
        >>> print(summary(spec))  # doctest: +ELLIPSIS
        top eigenvalues: 2
        ...
    """
    lines = [
        "top eigenvalues: " + ", ".join(f"{v:.4g}" for v in spec.top_eigenvalues),
        f"trace: {spec.trace:.4g} ± {spec.trace_stderr:.2g} "
        f"({spec.probes} probes, {spec.trace_method})",
        f"{spec.hvp_count} Hessian-vector products in {spec.seconds:.1f} s",
        f"{'layer':<32} {'params':>9} {'trace':>11} {'± stderr':>9} {'trace/param':>11} "
        f"{'top eig':>10}",
    ]
    mean = spec.layer_mean_trace
    for fqn, tr in spec.layer_trace.items():
        eig = spec.layer_top_eigenvalue.get(fqn, math.nan)
        lines.append(
            f"{fqn:<32} {spec.layer_params[fqn]:>9} {tr:>11.4g} "
            f"{spec.layer_trace_stderr[fqn]:>9.2g} {mean[fqn]:>11.4g} {eig:>10.4g}"
        )
    return "\n".join(lines)
