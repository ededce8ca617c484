"""EfficientNet-Lite0 (issue 15): where W8A8 loses its top-1 agreement with FP32, and what wins it
back. Needs ``pip install 'squeezer[efficientnet]'``.

    python benchmarks/efficientnet_qat.py layers [--json layers.json]   # one layer at a time
    python benchmarks/efficientnet_qat.py ptq    [--json ptq.json]      # range choices, crops
    python benchmarks/efficientnet_qat.py keep   [--json keep.json]     # a few layers in float
    python benchmarks/efficientnet_qat.py qat    [--json qat.json]      # QAT + KD at W8A8

Every part evaluates on the evaluation crops of the ``photos`` set (every ``--every``-th, as
``efficientnet_deploy.py`` does) against the FP32 logits: top-1 / top-5 agreement, KL, and the
agreement on the crops whose FP32 top-1/top-2 margin is over 0.1. Calibration and training use
crops of the calibration photos only (``--crops`` per photo), never an evaluation photo.

``layers``: the BatchNorm-folded model with a single layer quantized, weights only (W8) or its
input activation only (A8, the weight left in float), for every layer: which layers cost the
agreement. ``ptq``: W8A8 (BatchNorm folded, bias correction) with each activation range observer
(min-max, percentile 99.99 / 99.999, MSE-optimal clipping); ``--calib`` sets how many crops.
``keep``: the same with a few layers' weights (``--float``) kept in float. ``qat``: W8A8 + bias
correction, then quantization-aware training with distillation from FP32
(``squeezer.train.finetune``: KL at ``--temperature`` + cross-entropy on the FP32 labels) on the
calibration crops, a tenth of them held out to pick the epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from squeezer.config import Plan  # noqa: E402
from squeezer.images import fidelity, photo_dataset, predictions  # noqa: E402
from squeezer.integer import fold_batchnorm  # noqa: E402
from squeezer.quant.apply import quantize  # noqa: E402
from squeezer.quant.modules import QuantMixin  # noqa: E402
from squeezer.templates import uniform_plan  # noqa: E402
from squeezer.zoo import create  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from efficientnet_deploy import log, margin_agreement  # noqa: E402


def setup(args):
    """(FP32 model, its BN-folded copy, the photo data set, evaluation crops, FP32 logits on them,
    calibration batches of 32 of ``args.calib`` crops spread over the calibration photos)."""
    t = time.perf_counter()
    model = create("efficientnet_lite0:imagenet").eval()
    ds = photo_dataset(model, calib_crops=args.crops)
    x_test = ds.x_test[:: args.every]
    ref = predictions(model, x_test, 32)
    step = max(1, len(ds.x_train) // args.calib)
    x_cal = ds.x_train[::step][: args.calib]
    calib = [x_cal[i : i + 32] for i in range(0, len(x_cal), 32)]
    log(f"photo set: {len(ds.x_train)} calibration-photo crops, {len(x_test)} evaluation crops, "
        f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    return model, fold_batchnorm(model), ds, x_test, ref, calib


def score(ref: torch.Tensor, out: torch.Tensor) -> dict:
    return {**fidelity(ref, out), "margin>0.1": margin_agreement(ref, out)}


def w8a8(model, **act) -> Plan:
    """Uniform W8A8, per-channel weights, with the activation settings ``act`` (observer ...)."""
    plan = uniform_plan(model, 8, act_bits=8)
    return Plan({k: replace(v, **act) for k, v in plan.layers.items()}, meta=plan.meta)


# --------------------------------------------------------------------------------------------------


def layers(args) -> dict:
    """One layer at a time: W8 of its weight, or A8 of its input with the weight in float."""
    _, folded, _, x_test, ref, calib = setup(args)
    full = w8a8(folded)
    rows = {}
    for fqn, spec in full.layers.items():
        row = {}
        only = Plan({fqn: replace(spec, act_bits=None)}, meta={})
        row["W8"] = fidelity(ref, predictions(quantize(folded, only), x_test, 32))
        q = quantize(folded, Plan({fqn: spec}, meta={}), calib=calib)
        for m in q.modules():
            if isinstance(m, QuantMixin):
                m.weight_quantizer.enabled = False  # the weight in float: the activation alone
        row["A8"] = fidelity(ref, predictions(q, x_test, 32))
        rows[fqn] = row
        log(f"{fqn}: W8 kl {row['W8']['kl']:.5f} top1 {row['W8']['top1']:.2f} | "
            f"A8 kl {row['A8']['kl']:.5f} top1 {row['A8']['top1']:.2f}")  # fmt: skip
    return {"layers": rows, "eval_crops": len(x_test), "calib_crops": sum(map(len, calib))}


def ptq(args) -> dict:
    """W8A8 (BatchNorm folded, bias correction) with each activation observer."""
    _, folded, _, x_test, ref, calib = setup(args)
    variants = {
        "percentile 99.99 (default)": {},
        "percentile 99.999": {"act_percentile": 99.999},
        "min-max": {"act_observer": "minmax"},
        "MSE-optimal clipping": {"act_observer": "mse"},
    }
    rows, times = {}, {}
    for name, act in variants.items():
        key = name + " + bias correction"
        t = time.perf_counter()
        q = quantize(folded, w8a8(folded, **act), calib=calib, bias_correction=True)
        times[key] = time.perf_counter() - t
        rows[key] = score(ref, predictions(q, x_test, 32))
        log(f"{key}: {rows[key]} ({times[key]:.0f} s)")
    return {"fidelity": rows, "quantize seconds": times, "eval_crops": len(x_test),
            "calib_crops": sum(map(len, calib))}  # fmt: skip


def keep(args) -> dict:
    """W8A8 + bias correction (BatchNorm folded), and the same with the ``--float`` layers left
    out of the plan (weights and inputs in float, as an export deploys them)."""
    _, folded, _, x_test, ref, calib = setup(args)
    full = w8a8(folded)
    rows = {
        "all W8A8": score(
            ref, predictions(quantize(folded, full, calib=calib, bias_correction=True), x_test, 32)
        )
    }
    log(f"all W8A8: {rows['all W8A8']}")
    names = ", ".join(args.float)
    part = Plan({k: v for k, v in full.layers.items() if k not in args.float}, meta=full.meta)
    q = quantize(folded, part, calib=calib, bias_correction=True)
    rows[f"{names} in float"] = score(ref, predictions(q, x_test, 32))
    for k, v in rows.items():
        log(f"{k}: {v}")
    return {"fidelity": rows, "eval_crops": len(x_test), "calib_crops": sum(map(len, calib))}


def qat(args) -> dict:
    """W8A8 + bias correction of the BatchNorm-folded model, then QAT + KD from FP32."""
    from squeezer.train import finetune

    model, folded, ds, x_test, ref, calib = setup(args)
    act = {"act_observer": args.observer} if args.observer else {}
    t = time.perf_counter()
    q = quantize(folded, w8a8(folded, **act), calib=calib, bias_correction=True)
    times = {"quantize + calibrate + bias correction": time.perf_counter() - t}
    rows = {"W8A8 + bias correction (PTQ)": score(ref, predictions(q, x_test, 32))}
    log(f"PTQ: {rows['W8A8 + bias correction (PTQ)']}")
    t = time.perf_counter()
    r = finetune(q, ds, teacher=model, epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                 alpha=args.alpha, temperature=args.temperature, lsq=args.lsq, freeze_bn=True,
                 val_fraction=0.1, seed=args.seed, progress=False)  # fmt: skip
    times["QAT + KD"] = time.perf_counter() - t
    key = f"QAT + KD, {args.epochs} epochs (best {r.best_epoch})"
    rows[key] = score(ref, predictions(r.model, x_test, 32))
    log(f"{key}: {rows[key]}; history {r.history}")
    return {"fidelity": rows, "history": list(r.history), "seconds": times,
            "eval_crops": len(x_test), "train_crops": len(ds.x_train),
            "calib_crops": sum(map(len, calib)), "settings": {k: v for k, v in vars(args).items()
                                                            if k not in ("json", "part")}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("layers", "ptq", "keep", "qat"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=4, help="evaluate every N-th crop")
    ap.add_argument("--crops", type=int, default=32, help="crops per calibration photo")
    ap.add_argument("--calib", type=int, default=96, help="crops activation ranges are set on")
    ap.add_argument("--observer", default=None, help="qat: activation observer (default's)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0.95)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lsq", action="store_true", help="qat: learn the step sizes (LSQ)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--float",
        nargs="+",
        default=["stem.conv", "blocks.0.depthwise.conv"],
        help="keep: layers whose weights stay in float",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"layers": layers, "ptq": ptq, "keep": keep, "qat": qat}[args.part](args)
    res["threads"] = args.threads
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
