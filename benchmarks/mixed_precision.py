"""Mixed precision by Hessian sensitivity vs uniform, random and measured-sensitivity plans.

For each built-in net (trained here, seeded) and each average-weight-bits budget, with activations
at 8 bits and per-channel weights, compare the test accuracy of:

- ``hessian``: HAWQ-V2's trace sensitivity (arXiv:1911.03852) + the exact ILP planner;
- ``eigen``: HAWQ's top-eigenvalue sensitivity (arXiv:1905.03696) + the same planner;
- ``measured``: the loss increase measured on training data when one layer is quantized;
- ``uniform``: every layer at the budget's width (only where the budget is a whole width);
- ``random``: plans drawn uniformly from all assignments whose average bits lie in
  [budget − 0.25, budget] (the mean, standard deviation and best of ``--random`` draws).

Run:  python benchmarks/mixed_precision.py            (about 5 minutes on 2 CPU cores)
      python benchmarks/mixed_precision.py --models digits_cnn --bits 3 --random 3   (quick)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from squeezer.config import Budget, LayerQuant, Plan
from squeezer.costs import plan_costs
from squeezer.data import Batches, evaluate, load_data, mean_loss
from squeezer.plan import plan
from squeezer.quant.apply import quantize
from squeezer.sensitivity import sensitivity
from squeezer.spectrum import analyze
from squeezer.train import fit
from squeezer.zoo import MODELS, create

CANDIDATES = (2, 3, 4, 8)
TEMPLATE = LayerQuant(act_bits=8)  # per-channel symmetric weights, 8-bit activations


def random_plans(costs, budget_bits: float, n: int, seed: int, window: float = 0.25):
    """``n`` assignments drawn uniformly (seeded) from all with average bits in the window."""
    names = list(costs.params)
    pool = []
    for combo in itertools.product(CANDIDATES, repeat=len(names)):
        a = dict(zip(names, combo, strict=True))
        if budget_bits - window <= costs.total("bits", a) <= budget_bits + 1e-9:
            pool.append(a)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=g)[:n].tolist()
    return [pool[i] for i in order], len(pool)


def to_plan(bits: dict[str, int], method: str) -> Plan:
    return Plan(
        {k: LayerQuant(bits=b, act_bits=8) for k, b in bits.items()}, meta={"method": method}
    )


def run_model(name: str, budgets, n_random: int, epochs: int, seed: int, log) -> dict:
    entry = MODELS[name]
    ds = load_data(entry.data, seed=seed)
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # zoo.create draws the initial weights from the global generator
    net, info = fit(create(name), ds, epochs=epochs, seed=seed)
    log(
        f"{name}: trained {epochs} epochs in {time.perf_counter() - t0:.0f} s, top1 {info['top1']:.2f}"
    )
    # Analysis, sensitivity and calibration all use the first 1024 training samples.
    train = Batches(ds.x_train, ds.y_train, 256, limit=1024)
    test = ds.test_batches()
    t0 = time.perf_counter()
    spec = analyze(net, ds.task.loss, train, top_k=1, seed=seed)
    t_analyze = time.perf_counter() - t0
    log(f"  analyze: {spec.probes} probes, {spec.hvp_count} HVPs, {t_analyze:.0f} s")
    sens = {
        "hessian": sensitivity(net, spec, bits=CANDIDATES),
        "eigen": sensitivity(net, spec, bits=CANDIDATES, method="eigen"),
    }
    t0 = time.perf_counter()
    sens["measured"] = sensitivity(net, bits=CANDIDATES, method="measured", data=train,
                                   loss_fn=ds.task.loss)  # fmt: skip
    t_measured = time.perf_counter() - t0
    example = next(iter(test))[0][:1]
    costs = plan_costs(net, CANDIDATES, example=example, template=TEMPLATE)
    float_top1 = evaluate(net, test, ds.task)
    float_loss = mean_loss(net, test, ds.task)

    def score(p: Plan) -> dict:
        q = quantize(net, p, calib=train)
        bits = p.bits()
        return {
            "bits": bits,
            "avg_bits": costs.total("bits", bits),
            "size_bytes": costs.total("size_bytes", bits),
            "top1": evaluate(q, test, ds.task),
            "loss_increase": mean_loss(q, test, ds.task) - float_loss,
            "predicted_omega": sens["hessian"].total(bits),
        }

    rows = []
    for b in budgets:
        budget = Budget(bits=b)
        row = {"budget_bits": b}
        for method, s in sens.items():
            t0 = time.perf_counter()
            p = plan(s, budget, costs=costs)
            row[method] = {**score(p), "plan_s": time.perf_counter() - t0}
        if float(b).is_integer() and int(b) in CANDIDATES:
            row["uniform"] = score(to_plan({k: int(b) for k in costs.params}, "uniform"))
        draws, pool = random_plans(costs, b, n_random, seed)
        rnd = [score(to_plan(a, "random")) for a in draws]
        top = [r["top1"] for r in rnd]
        row["random"] = {
            "pool": pool,
            "n": len(rnd),
            "top1_mean": statistics.fmean(top),
            "top1_std": statistics.stdev(top) if len(top) > 1 else 0.0,
            "top1_best": max(top),
            "avg_bits_mean": statistics.fmean(r["avg_bits"] for r in rnd),
            "draws": rnd,
        }
        rows.append(row)
        log(
            f"  bits<={b}: hessian {row['hessian']['top1']:.2f} ({row['hessian']['avg_bits']:.2f} b)"
            + (f", uniform {row['uniform']['top1']:.2f}" if "uniform" in row else "")
            + f", random mean {row['random']['top1_mean']:.2f} best {row['random']['top1_best']:.2f}"
            + f", measured {row['measured']['top1']:.2f}, eigen {row['eigen']['top1']:.2f}"
        )
    # Re-planning time: a new budget on the same sensitivity (median of 20 solves).
    times = []
    for i in range(20):
        t0 = time.perf_counter()
        plan(sens["hessian"], Budget(bits=2.5 + 0.05 * i), costs=costs)
        times.append(time.perf_counter() - t0)
    return {
        "model": name,
        "data": entry.data,
        "epochs": epochs,
        "float_top1": float_top1,
        "test_samples": len(ds.y_test),
        "layers": {k: int(v) for k, v in costs.params.items()},
        "trace_per_param": {k: spec.layer_trace[k] / spec.layer_params[k] for k in costs.params},
        "analyze_s": t_analyze,
        "measured_sensitivity_s": t_measured,
        "replan_ms_median": 1e3 * statistics.median(times),
        "rows": rows,
    }


def markdown(results: list[dict]) -> str:
    out = []
    for r in results:
        out.append(
            f"\n**{r['model']}** on {r['data']} ({r['test_samples']} test samples, float top-1 "
            f"{r['float_top1']:.2f}%; layers {', '.join(f'{k} ({v})' for k, v in r['layers'].items())})\n"
        )
        out.append(
            "| avg bits ≤ | Hessian (trace) | eigen | measured | uniform | random mean ± std | "
            "random best |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for row in r["rows"]:

            def cell(m, row=row):
                return f"{row[m]['top1']:.2f} ({row[m]['avg_bits']:.2f} b)"

            rnd = row["random"]
            out.append(
                f"| {row['budget_bits']:g} | {cell('hessian')} | {cell('eigen')} | "
                f"{cell('measured')} | "
                + (f"{row['uniform']['top1']:.2f}" if "uniform" in row else "—")
                + f" | {rnd['top1_mean']:.2f} ± {rnd['top1_std']:.2f} ({rnd['avg_bits_mean']:.2f} b)"
                f" | {rnd['top1_best']:.2f} |"
            )
        out.append(
            "\nHessian plan bits per layer: "
            + "; ".join(
                f"≤{row['budget_bits']:g}: "
                + ", ".join(f"{k}={b}" for k, b in row["hessian"]["bits"].items())
                for row in r["rows"]
            )
        )
        out.append(
            f"\nAnalysis {r['analyze_s']:.0f} s; measured sensitivity {r['measured_sensitivity_s']:.1f} s; "
            f"re-planning for a new budget {r['replan_ms_median']:.0f} ms (median of 20)."
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_cnn,mnist1d_cnn")
    ap.add_argument("--bits", default="2.5,3,4", help="average weight bits budgets")
    ap.add_argument("--random", type=int, default=10, help="random plans per budget")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.bits.split(",")]
    results = []
    for name in args.models.split(","):
        results.append(run_model(name, budgets, args.random, args.epochs, args.seed, print))
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
