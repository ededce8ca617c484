"""EfficientNet-Lite0 (ImageNet weights) on the offline photos, issues 15 and 18: Hessian mixed
precision at 4-5 weight bits against uniform 4 and 5 bits, data-free calibration (ZeroQ distilled
inputs against Gaussian noise and real crops), and the mixed plan exported to ONNX against W8A8.
Fidelity is to the FP32 model (top-1 / top-5 agreement, KL; ``squeezer.images.fidelity``). Needs
``pip install 'squeezer[efficientnet]'``; one thread.

Two parts, each writing its own JSON (``--out``):

``mixed``: the Hessian analysis of squeezer's chain (``squeezer.pipeline.analysis_for``: per-layer
  Hutchinson traces, HAWQ-V2 sensitivity, costs, Pareto frontier) on ``--samples`` calibration
  crops in one batch, at most ``--probes`` probes, no top eigenvalue (the planner uses traces
  only), timed; plans at 4.0, 4.5 and 5.0 average weight bits (``choose_plan``, timed) and uniform
  4, 5 and 8 bits, all with 8-bit activations and per-channel weights, calibrated on the ``real``
  source's crops, evaluated on every ``--every``-th evaluation crop. Then the ``--export`` row and
  W8A8 are exported with ``squeezer.export.export_onnx`` as ``squeezer export`` does (sub-8-bit
  codes packed): file size against the theoretical size, and ONNX Runtime latency at batch 1 and
  32 (medians, the two sessions timed round-robin in one process).

``datafree``: uniform W8A8, W6A6 and W4A8 calibrated on ZeroQ distilled inputs
  (``squeezer.zeroshot.distill``, ``--seeds`` seeds, ``--samples`` inputs of ``--steps`` Adam
  steps, BatchNorm statistics of the batch as ``--calib zeroshot`` matches at 8-bit and 6-bit
  activations), on Gaussian noise (the ``noise`` calibration source, same seeds and count), and on
  real calibration crops (the same count, and all that the ``real`` source takes).

Run:  python benchmarks/efficientnet_mixed.py mixed --samples 8 --probes 40 --out mixed.json
      python benchmarks/efficientnet_mixed.py datafree --every 4 --samples 16 --steps 40 \
          --out datafree.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from squeezer import quantize
from squeezer.budget import Budget
from squeezer.calibration import source
from squeezer.images import fidelity, predictions
from squeezer.measure import average_bits, model_bytes
from squeezer.pipeline import choose_plan
from squeezer.templates import uniform_plan
from squeezer.zeroshot import bn_stat_loss, distill

CONFIGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8)}


def _dump(path: Path, doc: dict) -> None:
    doc["loadavg_now"] = os.getloadavg()
    path.write_text(json.dumps(doc, indent=1))


def _evaluate(model, plan, calib, x_test, ref) -> dict:
    t0 = time.perf_counter()
    q = quantize(model, plan, calib=calib)
    t1 = time.perf_counter()
    row = fidelity(ref, predictions(q, x_test, 32))
    row.update(size_bytes=model_bytes(model, plan), avg_bits=average_bits(model, plan),
               quantize_s=t1 - t0, evaluate_s=time.perf_counter() - t1)  # fmt: skip
    return row, q


def mixed(args: argparse.Namespace) -> None:
    from squeezer.data import load_data
    from squeezer.pipeline import analysis_for
    from squeezer.templates import template_for
    from squeezer.zoo import create

    t0 = time.perf_counter()
    model = create("efficientnet_lite0:imagenet").eval()
    data = load_data("photos", model=model)
    doc = {"photos_s": time.perf_counter() - t0, "rows": {}}
    x_test = data.x_test[:: args.every]
    ref = predictions(model, x_test, 32)
    calibration = source("real")(model, data)
    tpl = template_for(model)
    settings = replace(tpl.analysis, batch_size=args.samples, top_k=0, max_probes=args.probes)
    t0 = time.perf_counter()
    analysis = analysis_for(model, data, calibration, replace(tpl, analysis=settings),
                            samples=args.samples)  # fmt: skip
    spec = analysis.spectrum
    rel = sorted(spec.layer_trace_stderr[k] / abs(v) for k, v in spec.layer_trace.items() if v)
    doc.update(
        analysis_s=time.perf_counter() - t0,
        settings=asdict(settings),
        widths=list(tpl.bits),
        spectrum={
            "samples": spec.samples,
            "probes": spec.probes,
            "hvp_count": spec.hvp_count,
            "seconds": spec.seconds,
            "trace": spec.trace,
            "trace_stderr": spec.trace_stderr,
            "layers": len(rel),
            "layer_rel_stderr_median": rel[len(rel) // 2],
            "layer_rel_stderr_max": rel[-1],
        },
        eval_crops=len(x_test),
        calib_crops=sum(len(b[0]) for b in calibration.batches),
    )
    print("analysis", doc["analysis_s"], doc["spectrum"], flush=True)
    _dump(args.out, doc)
    plans = {}
    for bits in (4.0, 4.5, 5.0):
        t0 = time.perf_counter()
        plans[f"Hessian mixed {bits}"] = choose_plan(analysis, Budget(bits=bits))
        doc.setdefault("plan_s", {})[str(bits)] = time.perf_counter() - t0
    for bits in (4, 5, 8):
        plans[f"uniform W{bits}A8"] = uniform_plan(model, bits, act_bits=8)
    qmodels = {}
    for name, plan in plans.items():
        row, qmodels[name] = _evaluate(model, plan, calibration.batches, x_test, ref)
        widths = [s.bits for s in plan.layers.values()]
        row["layers_per_width"] = {str(b): widths.count(b) for b in sorted(set(widths))}
        doc["rows"][name] = row
        print(name, row, flush=True)
        _dump(args.out, doc)
    doc["onnx"] = _onnx({k: qmodels[k] for k in (args.export, "uniform W8A8")}, x_test, args)
    _dump(args.out, doc)


def _onnx(models: dict, inputs: torch.Tensor, args: argparse.Namespace) -> dict:
    """Export each model as ``squeezer export`` does (packed sub-8-bit codes), then time the
    files in ONNX Runtime round-robin."""
    from squeezer.export import export_onnx, latency_table, ort_session

    doc, sessions = {"runs": args.runs, "threads": args.threads}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, q in models.items():
            path = Path(tmp) / f"{len(sessions)}.onnx"
            t0 = time.perf_counter()
            rep = export_onnx(q, path, inputs[:32], requantize=True, threads=args.threads)
            doc[name] = {
                "export_s": time.perf_counter() - t0,
                "size_bytes": rep.size_bytes,
                "theoretical_bytes": rep.theoretical_bytes,
                "size_over_theoretical": rep.size_bytes / rep.theoretical_bytes,
                "packed_bits": rep.packed_bits,
                "max_abs_error_vs_squeezer": rep.max_abs_error,
            }
            sessions[name] = ort_session(path, threads=args.threads)
            print(name, doc[name], flush=True)
        examples = {1: inputs[:1], 32: inputs[:32]}
        lat = latency_table(sessions, examples, threads=args.threads, runs=args.runs)
    mixed_name, int8 = list(models)
    for b in ("batch_1", "batch_32"):
        for name in models:
            doc[name][f"{b}_median_ms"] = lat[b][name]["median_ms"]
        ratio = lat[b][mixed_name]["median_ms"] / lat[b][int8]["median_ms"]
        doc[f"{b}_mixed_over_w8a8"] = ratio
    print(json.dumps(doc, indent=1), flush=True)
    return doc


def datafree(args: argparse.Namespace) -> None:
    from squeezer.data import load_data
    from squeezer.zoo import create

    model = create("efficientnet_lite0:imagenet").eval()
    data = load_data("photos", model=model)
    x_test = data.x_test[:: args.every]
    ref = predictions(model, x_test, 32)
    real_all = source("real")(model, data).batches
    n = args.samples
    sources = {"real": {"all": real_all, f"{n}": data.calibration_batches(n, batch_size=n)}}
    doc = {"eval_crops": len(x_test), "samples": n, "steps": args.steps, "distill": {},
           "bn_stat_loss": {}, "rows": {}}  # fmt: skip
    for seed in args.seeds:
        noise = source("noise")(model, data, seed=seed, samples=n).batches
        sources.setdefault("noise", {})[f"seed {seed}"] = noise
        d = distill(model, n, seed=seed, steps=args.steps, batch_size=n, match="batch")
        sources.setdefault("zeroshot", {})[f"seed {seed}"] = [d.inputs]
        doc["distill"][f"seed {seed}"] = {"seconds": d.seconds, "loss_before": d.loss_before,
                                          "loss_after": d.loss_after, "n_bn": d.n_bn}  # fmt: skip
        print(d.summary(), flush=True)
    for kind, variants in sources.items():
        for name, batches in variants.items():
            x = torch.cat([b[0] if isinstance(b, tuple | list) else b for b in batches])
            doc["bn_stat_loss"][f"{kind} {name}"] = bn_stat_loss(model, x[:n])
    for cfg, (wb, ab) in CONFIGS.items():
        plan = uniform_plan(model, wb, act_bits=ab)
        for kind, variants in sources.items():
            for name, batches in variants.items():
                row, _ = _evaluate(model, plan, batches, x_test, ref)
                doc["rows"].setdefault(cfg, {}).setdefault(kind, {})[name] = row
                print(cfg, kind, name, row, flush=True)
                _dump(args.out, doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("mixed", "datafree"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=2, help="evaluate every N-th evaluation crop")
    ap.add_argument(
        "--samples",
        type=int,
        default=8,
        help="mixed: Hessian samples (one batch); datafree: inputs per source",
    )
    ap.add_argument("--probes", type=int, default=40, help="mixed: most Hutchinson probes")
    ap.add_argument("--export", default="Hessian mixed 4.5", help="mixed: the row exported")
    ap.add_argument("--steps", type=int, default=40, help="datafree: distillation steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=int, default=20, help="onnx: timed runs per batch and file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"mixed": mixed, "datafree": datafree}[args.part](args)


if __name__ == "__main__":
    main()
