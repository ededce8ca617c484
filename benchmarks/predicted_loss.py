"""How well does the planner's predicted loss increase (ΣΩ, HAWQ-V2's second-order estimate) match
the loss increase measured after quantization?

For nets trained on digits and MNIST-1D: the Hessian analysis of `squeezer compress` (512 training
samples), then the ILP plan for each average-bits budget, weights only (no activation
quantization, which ΣΩ does not model). The measured increase is reported on three sets: the 512
samples the Hessian saw, the whole training split, and the test split.

Run:  python benchmarks/predicted_loss.py
"""

from __future__ import annotations

import argparse
import time

import torch

from squeezer.calibration import source
from squeezer.config import Budget
from squeezer.data import Batches, load_data, mean_loss
from squeezer.pipeline import analysis_for, choose_plan
from squeezer.quant.apply import quantize
from squeezer.templates import template_for
from squeezer.train.fit import fit
from squeezer.zoo import MODELS as ZOO
from squeezer.zoo import create

BUDGETS = (8.0, 6.0, 4.0, 3.0, 2.5, 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits_cnn", "mnist1d_cnn"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        ds = load_data(ZOO[name].data)
        torch.manual_seed(0)
        net, _ = fit(create(name), ds, epochs=args.epochs, seed=0)
        net.eval()
        t0 = time.perf_counter()
        calib = source("real")(net, ds)
        analysis = analysis_for(net, ds, calib, template_for(net), act_bits=None)
        sets = {
            "Hessian's 512": ds.analysis_batches(512),
            "train split": Batches(ds.x_train, ds.y_train, 256),
            "test split": ds.test_batches(),
        }
        base = {k: mean_loss(net, b, ds.task) for k, b in sets.items()}
        print(
            f"\n### {name}: analysis {time.perf_counter() - t0:.0f} s; FP32 loss "
            + ", ".join(f"{k} {v:.4g}" for k, v in base.items())
        )
        print("| avg bits ≤ | predicted ΣΩ | " + " | ".join(f"measured, {k}" for k in sets) + " |")
        print("|---|---|" + "---|" * len(sets))
        for bits in BUDGETS:
            plan = choose_plan(analysis, Budget(bits=bits))
            q = quantize(net, plan)
            inc = [mean_loss(q, b, ds.task) - base[k] for k, b in sets.items()]
            cells = " | ".join(f"{v:.3g}" for v in inc)
            print(f"| {bits:g} | {plan.meta['predicted_omega']:.3g} | {cells} |")


if __name__ == "__main__":
    main()
