"""Hessian engine vs PyHessian (Yao et al., arXiv:1912.07145) on one batch of 256 digits.

Two trained nets: the zoo's ``digits_cnn`` (73k parameters) and a 1.9M-parameter residual conv
net (the zoo's ResNet class, widths 80/160/320) on the same batch. Every run of either tool gets
the same model, batch and loss, and both keep the batch's gradient graph between products.

Measured, medians over ``--repeats`` seeds (PyHessian draws from the global torch RNG, which is
seeded the same way; the trace measurements on the 1.9M net use one seed):

1. top-1 and top-3 eigenvalues: squeezer's Lanczos (rtol 1e-3) vs PyHessian's power iteration
   with deflation (tol 1e-3), time (constructor included) and agreement with a tight reference;
2. the trace: PyHessian's default stopping rule vs squeezer's 5% relative-standard-error rule;
3. all per-layer traces from shared probes vs one whole-model trace at the same probe count, and
   vs layer-restricted probes looped over layers (each layer's own operator, same probe count);
4. Hessian-vector products to reach 5% relative standard error, Hutchinson vs Hutch++;
5. PyHessian's ``density()`` (it calls ``torch.eig``, removed from torch) and squeezer's SLQ.

PyHessian is not a squeezer dependency; install it for this script only:

    pip install pyhessian

Run:  python benchmarks/hessian_vs_pyhessian.py               (~30 min on 2 quiet CPU cores)
      python benchmarks/hessian_vs_pyhessian.py --quick       (digits net only, 1 repeat)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from squeezer.data import load_data
from squeezer.estimators import hutchinson, rademacher, slq, top_eigen
from squeezer.hvp import HessianOperator
from squeezer.train import fit
from squeezer.zoo import create
from squeezer.zoo.small import ResNet

CE = nn.CrossEntropyLoss()


def import_pyhessian():
    try:
        # The package re-exports the class under the module's name: fetch the module itself.
        return importlib.import_module("pyhessian.hessian")
    except ImportError:
        sys.exit("this benchmark compares against PyHessian: run `pip install pyhessian` first")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def masked_probe_trace(op: HessianOperator, sl: slice, probes: int, g: torch.Generator) -> float:
    """Hutchinson on one layer with probes zero outside it, through full HVPs; its stderr."""
    samples = []
    for _ in range(probes):
        z = torch.zeros(op.dim, dtype=torch.float64)
        z[sl] = rademacher(sl.stop - sl.start, g)
        samples.append(float(z[sl] @ op.matvec(z)[sl]))
    return float(torch.tensor(samples).std() / len(samples) ** 0.5)


def top_eigen_fresh(make_op: Callable[[], HessianOperator], k: int, g: torch.Generator):
    """Operator construction (copy, forward, gradient graph) included, like PyHessian's."""
    return top_eigen(make_op(), k, rtol=1e-3, generator=g)


def pyh_eigenvalues(make: Callable[[], object], k: int):
    return make().eigenvalues(top_n=k, tol=1e-3, maxIter=100)


def trained_models(data, cache: Path | None, quick: bool) -> dict[str, nn.Module]:
    """The two nets, trained with squeezer.train.fit (seeded); weights cached in ``cache``."""
    specs = {"digits_cnn (73k)": (lambda: create("digits_cnn"), 15)}
    if not quick:
        specs["resnet 80/160/320 (1.9M)"] = (lambda: ResNet(1, (80, 160, 320), 1, 10), 8)
    out = {}
    for name, (factory, epochs) in specs.items():
        model = factory()
        path = cache / f"{name.split()[0]}_{epochs}.pt" if cache else None
        if path is not None and path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            print(f"training {name} for {epochs} epochs ...", flush=True)
            model, info = fit(model, data, epochs=epochs, seed=0)
            print(f"  test top1 {info.get('top1', float('nan')):.1f}%", flush=True)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), path)
        out[name] = model.eval()
    return out


class PyHessianCounter:
    """Counts PyHessian's Hessian-vector products (it calls ``hessian_vector_product``)."""

    def __init__(self, ph) -> None:
        self.ph, self.count = ph, 0
        original = ph.hessian_vector_product

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        ph.hessian_vector_product = counted


def bench_model(
    name: str, model: nn.Module, batch, ph, counter, repeats: int, heavy: int, probes: int
):
    """All measurements on one net: eigenvalues over ``repeats`` seeds, the rest over ``heavy``."""
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n## {name}: {n_params:,} parameters, batch {batch[0].shape[0]}", flush=True)
    res: dict[str, object] = {"name": name, "params": n_params}

    def ours_op() -> HessianOperator:
        return HessianOperator(model, CE, batch)

    def pyh() -> object:
        return ph.hessian(copy.deepcopy(model), CE, data=batch, cuda=False)

    # Reference eigenvalues: Lanczos to rtol 1e-7.
    ref = top_eigen(ours_op(), 3, rtol=1e-7, max_iter=200).values
    print(f"reference top-3 eigenvalues {[f'{v:.6g}' for v in ref]}", flush=True)

    for k in (1, 3):
        t_ours, t_pyh, v_ours, v_pyh, it_ours, it_pyh = [], [], [], [], [], []
        for r in range(repeats):
            g = torch.Generator().manual_seed(r)
            e, t = timed(partial(top_eigen_fresh, ours_op, k, g))
            t_ours.append(t)
            v_ours.append(e.values)
            it_ours.append(e.iterations)
            torch.manual_seed(r)
            counter.count = 0
            (vals, _), t = timed(partial(pyh_eigenvalues, pyh, k))
            t_pyh.append(t)
            v_pyh.append(tuple(sorted(vals, reverse=True)))
            it_pyh.append(counter.count)
        err_ours = max(abs(v[i] - ref[i]) / abs(ref[i]) for v in v_ours for i in range(k))
        err_pyh = max(abs(v[i] - ref[i]) / abs(ref[i]) for v in v_pyh for i in range(k))
        gap = max(
            abs(a[i] - b[i]) / abs(ref[i])
            for a, b in zip(v_ours, v_pyh, strict=True)
            for i in range(k)
        )
        res[f"top{k}"] = dict(
            t_ours=median(t_ours),
            t_pyh=median(t_pyh),
            hvp_ours=median(it_ours),
            hvp_pyh=median(it_pyh),
            err_ours=err_ours,
            err_pyh=err_pyh,
            gap=gap,
        )
        print(
            f"top-{k}: squeezer {median(t_ours):.2f} s ({median(it_ours)} HVPs, max rel err "
            f"{err_ours:.1e}) | PyHessian {median(t_pyh):.2f} s ({median(it_pyh)} HVPs, max rel "
            f"err {err_pyh:.1e}) | ratio {median(t_ours) / median(t_pyh):.2f} | max disagreement "
            f"{gap:.1e}",
            flush=True,
        )

    # Trace: PyHessian's own stopping rule vs a 5% relative standard error target.
    tr_rows = []
    for r in range(heavy):
        op = ours_op()
        t, secs = timed(
            lambda op=op, r=r: hutchinson(
                op, rel_stderr=0.05, max_probes=400, generator=torch.Generator().manual_seed(r)
            )
        )
        torch.manual_seed(r)
        samples, secs_p = timed(lambda: pyh().trace(maxIter=100, tol=1e-3))
        s = torch.tensor(samples, dtype=torch.float64)
        se_p = float(s.std() / len(s) ** 0.5) if len(s) > 1 else float("nan")
        tr_rows.append((t.trace, t.stderr, t.probes, secs, float(s.mean()), se_p, len(s), secs_p))
    ref_tr = hutchinson(
        ours_op(),
        method="hutch++",
        sketch=20,
        max_probes=max(probes * 4, 100),
        probe_batch=1,
        generator=torch.Generator().manual_seed(99),
    )
    res["trace"] = dict(rows=tr_rows, ref=(ref_tr.trace, ref_tr.stderr, ref_tr.hvps))
    print(f"reference trace {ref_tr.trace:.5g} ± {ref_tr.stderr:.2g} ({ref_tr.hvps} HVPs)")
    for tr, se, n, secs, tp, sep, n_p, secs_p in tr_rows:
        z = abs(tr - tp) / (se**2 + sep**2) ** 0.5
        print(
            f"trace: squeezer {tr:.5g} ± {se:.2g} ({n} probes, {secs:.2f} s) | PyHessian "
            f"{tp:.5g} ± {sep:.2g} ({n_p} probes, {secs_p:.2f} s) | |diff|/combined se {z:.2f} | "
            f"vs reference: {tr / ref_tr.trace - 1:+.1%} / {tp / ref_tr.trace - 1:+.1%}",
            flush=True,
        )

    # Per-layer traces: shared probes vs one whole-model trace vs layer-restricted loops, the loop
    # done two ways: each layer's own (cheaper) operator, or full products of probes that are zero
    # outside the layer (what a whole-model HVP routine such as PyHessian's offers).
    op = ours_op()
    n_layers = len(op.layout.blocks)
    sketch = max(2, probes // 6)
    keys = ("whole", "shared", "loop_sub", "loop_full", "se_sub", "se_pp")
    m: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(heavy):
        _, t = timed(partial(hutchinson, op, blocks={}, max_probes=probes, generator=seeded(r)))
        m["whole"].append(t)
        shared, t = timed(partial(hutchinson, op, max_probes=probes, generator=seeded(r)))
        m["shared"].append(t)
        pp = hutchinson(
            op, max_probes=probes - 2 * sketch, method="hutch++", sketch=sketch, generator=seeded(r)
        )
        t0 = time.perf_counter()
        sub_se = {}
        for fqn, pname in op.layout.blocks.items():
            sub = op.restricted([pname])
            sub_se[fqn] = hutchinson(sub, blocks={}, max_probes=probes, generator=seeded(r)).stderr
            sub.release()
        m["loop_sub"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for sl in op.layout.block_slices().values():
            masked_probe_trace(op, sl, probes, seeded(r))
        m["loop_full"].append(time.perf_counter() - t0)
        m["se_sub"].append(median([shared.block_stderr[f] / sub_se[f] for f in sub_se]))
        m["se_pp"].append(median([pp.block_stderr[f] / sub_se[f] for f in sub_se]))
    med = {k: median(v) for k, v in m.items()}
    res["layers"] = dict(n_layers=n_layers, probes=probes, sketch=sketch, **med)
    print(
        f"per-layer traces ({n_layers} layers, {probes} probes): shared {med['shared']:.2f} s | "
        f"whole-model only {med['whole']:.2f} s (ratio {med['shared'] / med['whole']:.2f}) | "
        f"loop over layers, own operators {med['loop_sub']:.2f} s "
        f"(x{med['loop_sub'] / med['shared']:.1f}), masked probes through full HVPs "
        f"{med['loop_full']:.2f} s (x{med['loop_full'] / med['shared']:.1f})",
        flush=True,
    )
    print(
        f"  median per-layer stderr ratio (the masked loop draws the same estimates as the "
        f"own-operator loop): shared/own-operator {med['se_sub']:.2f}, "
        f"shared hutch++ (sketch {sketch}, same HVPs)/own-operator {med['se_pp']:.2f}",
        flush=True,
    )

    # Products needed for 5% relative standard error.
    need: dict[str, list[int]] = {"hutchinson": [], "hutch++ (sketch 10)": []}
    for r in range(heavy):
        for label, method in (("hutchinson", "hutchinson"), ("hutch++ (sketch 10)", "hutch++")):
            t = hutchinson(
                op,
                rel_stderr=0.05,
                max_probes=1000,
                method=method,
                sketch=10,
                generator=torch.Generator().manual_seed(100 + r),
            )
            need[label].append(t.hvps)
    res["hvps_5pct"] = {k: median(v) for k, v in need.items()}
    print(f"HVPs for 5% relative stderr: {res['hvps_5pct']}", flush=True)

    # Density: PyHessian's density() vs squeezer's SLQ.
    try:
        pyh().density(iter=10, n_v=1)
        res["pyh_density"] = "ran"
    except Exception as exc:  # it calls torch.eig, removed in torch 2.x
        res["pyh_density"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    d, t = timed(lambda: slq(op, probes=2, steps=32, generator=torch.Generator().manual_seed(0)))
    res["slq"] = dict(seconds=t, hvps=2 * 32, weights=sum(d.weights))
    print(f"PyHessian density(): {res['pyh_density']}; squeezer slq 2x32: {t:.2f} s", flush=True)

    # Cost of one product (graph kept), for scale.
    v = torch.randn(op.dim, dtype=torch.float64)
    t_hvp = median([timed(lambda: op.matvec(v))[1] for _ in range(5)])
    h = pyh()
    vs = [torch.randn_like(p) for p in h.params]
    t_hvp_p = median(
        [timed(lambda: ph.hessian_vector_product(h.gradsH, h.params, vs))[1] for _ in range(5)]
    )
    res["hvp_ms"] = (1e3 * t_hvp, 1e3 * t_hvp_p)
    print(f"one HVP: squeezer {1e3 * t_hvp:.0f} ms | PyHessian {1e3 * t_hvp_p:.0f} ms", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="seeds for the eigenvalue timings")
    ap.add_argument(
        "--heavy-repeats",
        type=int,
        default=3,
        help="seeds for the trace measurements on the digits net (the 1.9M net uses 1)",
    )
    ap.add_argument("--probes", type=int, default=30, help="probes for the per-layer timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="digits net only, one repeat")
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep trained weights in")
    args = ap.parse_args()
    ph = import_pyhessian()
    counter = PyHessianCounter(ph)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats

    data = load_data("digits", seed=0)
    batch = (data.x_train[:256], data.y_train[:256])
    models = trained_models(data, args.cache, args.quick)
    t0 = time.perf_counter()
    for i, (name, model) in enumerate(models.items()):
        heavy = 1 if args.quick or i > 0 else args.heavy_repeats
        probes = args.probes if i == 0 else max(12, 2 * args.probes // 3)
        bench_model(name, model, batch, ph, counter, repeats, heavy, probes)
    print(
        f"\ntotal {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
        f"{args.threads} threads"
    )


if __name__ == "__main__":
    main()
